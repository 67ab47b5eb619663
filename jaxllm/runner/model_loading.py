"""Build the model once: resolve the checkpoint, make the mesh, load sharded weights, flatten.

The NNX module is split once; the step functions close over (graphdef, treedef) and take the
flat weight leaves as their first argument (jax-notes item 9: flat leaves dispatch fastest).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.model_arch import ARCHITECTURES, ModelArch, load_arch
from jaxllm.models import family
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import AttentionFn, Kernels
from jaxllm.models.loader import load_weights, resolve_dtype, resolve_model_dir
from jaxllm.models.quantized import quantize_model, select_int4_kernel, with_requested_quantization
from jaxllm.models.quantized_fp8 import FP8_REQUESTS, quantize_fp8_model, with_requested_fp8
from jaxllm.models.sharding import ShardingRules, make_mesh, rules_for
from jaxllm.runner.experts import select_experts

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model_dir: Path
    arch: ModelArch
    dtype: Any  # jnp dtype of weights, activations and KV pages
    mesh: Mesh
    rules: ShardingRules
    graphdef: Any
    treedef: Any
    leaves: list[jax.Array]  # flat weights, each on its NamedSharding
    experts: Callable[..., jax.Array] | None = None  # MoE families: runner/experts.py's function

    def forward_fn(self, attention: AttentionFn):
        """(leaves, kv_pages, batch, placeholder_rows, prev_tokens) -> (kv_pages, logits [R, V] f32).

        A pure function to jit. Decode inputs still on device (async scheduling) are taken from
        the previous step's sampled tokens: placeholder_rows [T] (-1 = real input id) indexes
        prev_tokens [max_num_seqs]. Logits come back replicated (gathered over the vocab shards).
        """
        graphdef, treedef = self.graphdef, self.treedef
        replicated = NamedSharding(self.mesh, PartitionSpec())
        kernels = Kernels(attention, self.experts)

        def forward(leaves, kv_pages, batch: ForwardBatch, placeholder_rows, prev_tokens):
            rows = jnp.clip(placeholder_rows, 0, prev_tokens.shape[0] - 1)
            input_ids = jnp.where(placeholder_rows >= 0, prev_tokens[rows], batch.input_ids)
            batch = dataclasses.replace(batch, input_ids=input_ids)
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            kv_pages, logits = model(kv_pages, batch, kernels)
            return kv_pages, jax.lax.with_sharding_constraint(logits, replicated)

        return forward


def load_model(model_config: ModelConfig, parallel: ParallelConfig, devices=None) -> LoadedModel:
    start = time.perf_counter()
    model_dir = resolve_model_dir(model_config.model, model_config.revision)
    requested = model_config.quantization
    arch = with_requested_fp8(load_arch(model_dir), requested) if requested in FP8_REQUESTS else (
        with_requested_quantization(load_arch(model_dir), requested, model_config.load_format))
    tp = parallel.tensor_parallel_size
    mesh = make_mesh(tp, devices)
    rules = rules_for(arch, tp, parallel.enable_expert_parallel)
    platform = mesh.devices.flat[0].platform
    dtype = resolve_dtype(model_config.dtype, arch, platform)
    model = family(arch).abstract_model(arch, dtype, fuse_qkv=rules.kv_heads is not None)
    quantize_model(model, arch, dtype, rules, tp, select_int4_kernel(mesh))  # int4 checkpoints only
    quantize_fp8_model(model, arch, rules, tp)  # FP8 checkpoints and --quantization fp8 only
    graphdef, state = nnx.split(model)
    state = load_weights(model_dir, state, mesh, rules, model_config.load_format, model_config.seed,
                         ARCHITECTURES[arch.architecture].names, arch.quantization)
    leaves, treedef = jax.tree.flatten(state)
    logger.info(
        "Loaded %s (%s params, %s, %s) from %s on %d %s device(s) in %.1f s",
        arch.architecture, human_count(sum(leaf.size for leaf in leaves)), jnp.dtype(dtype).name,
        "dummy weights" if model_config.load_format == "dummy" else "safetensors", model_dir, tp, platform,
        time.perf_counter() - start,
    )
    experts = None if arch.moe is None else select_experts(mesh, rules)
    return LoadedModel(model_dir, arch, dtype, mesh, rules, graphdef, treedef, leaves, experts)


def human_count(count: int) -> str:
    """A count to three significant digits in the largest unit it reaches: 259968 -> "260K", 8.03e9 -> "8.03B"."""
    value, unit = float(count), ""
    for larger in ("K", "M", "B", "T"):
        if float(f"{value:.3g}") < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value:.3g}{unit}"
