"""FP8 (e4m3) weights and activations for the dense families (Llama, Mistral, Qwen2, Qwen3: llama.py;
GLM: glm4.py): `fp8` checkpoints (per-tensor `weight_scale`, or DeepSeek-V3's 128 x 128
`weight_scale_inv` blocks), compressed-tensors' float-quantized ones (per-tensor, per-channel or
block `weight_scale`), each with the checkpoint's static `input_scale` or dynamic per-token
activation scales, and `--quantization fp8` (`fp8_per_tensor`, `fp8_per_block`): a float checkpoint
quantized at load, with dynamic activation scales.

As for int4 (models/quantized.py), the family builds its bf16 modules and `quantize_fp8_model` swaps
each projection whose checkpoint modules are quantized for its FP8 twin. A twin keeps its bf16
module's weight shape, layout ([*N, K]: K minor, the layout cuBLASLt's FP8 GEMM takes) and logical
axes, so tensor parallelism shards it as the bf16 weight (XLA partitions the FP8 dot):

    qweight      e4m3 [*N, K]   from the same checkpoint tensors as the bf16 weight (`fused_from`)
    weight_scale f32 [*N, Kg]   Kg = 1 (per tensor or channel, repeated per output feature) or K / 128
    input_scale  f32 [parts]    static activations: each fused part's scale (their max is used, as vLLM)

The loader reads these fields through `Fp8Checkpoint`, which makes them out of the checkpoint's own
tensors (or quantizes a float weight at load). Dummy weights draw them by their `init` (`FP8_DUMMY_DRAWS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model_arch import Fp8Scheme, ModelArch, Quantization
from jaxllm.models.layers import FusedFrom, GateUpProjection, Linear, Part, QKVProjection
from jaxllm.models.quantized import SplitsQKV
from jaxllm.models.sharding import ShardingRules
from pallas_kernels.fp8_matmul import E4M3_MAX, Fp8Weights, fp8_matmul_xla
from pallas_kernels.fp8_matmul.formats import (
    per_feature_scales,
    quantize_blocks,
    quantize_per_tensor,
)

Fp8MatmulFn = Callable[[jax.Array, Fp8Weights], jax.Array]  # (x [M, K], w [*N, K]) -> [M, *N]

FP8_FAMILIES = ("llama", "glm4")
# `--quantization` values that ask for FP8 (vLLM's names): on a float checkpoint, quantized at load with
# one scale per weight tensor (fp8, fp8_per_tensor) or per 128 x 128 block.
FP8_REQUESTS = {"fp8": "tensor", "fp8_per_tensor": "tensor", "fp8_per_block": "block"}
FP8_FIELDS = ("qweight", "weight_scale", "input_scale")


# ----------------------------------------------------------------------------------------------
# Modules


class Fp8Projection(nnx.Module):
    """x [T, K] -> [T, *N] through an FP8 matmul, plus the bf16 module's bias [*N] if it has one."""

    def __init__(self, bf16: Linear | QKVProjection | GateUpProjection, scheme: Fp8Scheme, matmul: Fp8MatmulFn):
        meta = bf16.weight.get_metadata()
        shape, axes, fused = bf16.weight.shape, meta["logical_axes"], meta.get("fused_from")
        k = shape[-1]
        groups = k // scheme.block[1] if scheme.weight_scales == "block" else 1
        parts = [p.name.removesuffix(".weight") for p in fused.parts] if fused else None
        self.matmul = matmul
        self.qweight = _param(shape, jnp.float8_e4m3fn, axes, "fp8", _renamed(fused, "qweight", lambda p: p))
        self.weight_scale = _param(
            (*shape[:-1], groups), jnp.float32, (*axes[:-1], axes[-1] if groups > 1 else None), "fp8_scales",
            _renamed(fused, "weight_scale", lambda p: dataclasses.replace(
                p, hf_shape=(p.hf_shape[0], groups), shape=(*p.shape[:-1], groups))))
        self.input_scale = _param(
            (len(parts or [None]),), jnp.float32, (None,), "fp8_input_scale",
            FusedFrom.concat([(f"{name}.input_scale", (1,), (1,)) for name in parts], axis=0) if parts else None,
        ) if scheme.static_activations else None
        self.bias = getattr(bf16, "bias", None)

    def project(self, x: jax.Array) -> jax.Array:
        """x [T, K] -> [T, *N]."""
        input_scale = None if self.input_scale is None else jnp.max(self.input_scale[...])
        y = self.matmul(x, Fp8Weights(self.qweight[...], self.weight_scale[...], input_scale))
        return y if self.bias is None else y + self.bias[...]


def _param(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], init: str,
           fused_from: FusedFrom | None) -> nnx.Param:
    extra = {} if fused_from is None else {"fused_from": fused_from}
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes, init=init, **extra)


def _renamed(fused: FusedFrom | None, field: str, reshape: Callable[[Part], Part]) -> FusedFrom | None:
    """The bf16 weight's parts (`X.weight`) as the twin's `field` (`X.<field>`)."""
    if fused is None:
        return None
    return FusedFrom(tuple(reshape(dataclasses.replace(p, name=p.name.removesuffix("weight") + field))
                           for p in fused.parts))


class Fp8Linear(Fp8Projection):
    """`layers.Linear`'s twin: x [T, K] -> [T, N]."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(x)


class Fp8QKVProjection(SplitsQKV, Fp8Projection):
    """`layers.QKVProjection`'s FP8 twin."""


class Fp8GateUpProjection(Fp8Projection):
    """`layers.GateUpProjection`'s twin: N is [2, I] (gate, then up)."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, H] -> (gate [T, I], up [T, I])."""
        y = self.project(x)  # [T, 2, I]
        return y[:, 0], y[:, 1]


TWINS: dict[type, type[Fp8Projection]] = {Linear: Fp8Linear, QKVProjection: Fp8QKVProjection,
                                          GateUpProjection: Fp8GateUpProjection}
PROJECTIONS = {"self_attn": ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}


# ----------------------------------------------------------------------------------------------
# Swapping the bf16 projections for their twins


def quantize_fp8_model(model: nnx.Module, arch: ModelArch, rules: ShardingRules, tp: int,
                       matmul: Fp8MatmulFn = fp8_matmul_xla) -> None:
    """Replace, in place, each projection of the abstract `model` (a `layers.CausalLM` of a dense family)
    whose checkpoint modules `arch.quantization` converts by its FP8 twin; embeddings, norms and lm_head
    stay as they are. Raises ValueError where tp splits a block of block scales."""
    q = arch.quantization
    if q is None or q.fp8 is None:
        return
    if arch.family not in FP8_FAMILIES:
        raise ValueError(f"FP8 checkpoints are served for the dense families (Llama, Mistral, Qwen2, Qwen3, GLM), "
                         f"not {arch.architecture}")
    for n, layer in enumerate(model.model.layers):
        for block_name, attrs in PROJECTIONS.items():
            block = getattr(layer, block_name)
            for attr in attrs:
                bf16 = getattr(block, attr)
                if bf16 is not None:
                    _swap(block, attr, f"model.layers.{n}.{block_name}", bf16, q, rules, tp, matmul)


def _swap(parent: nnx.Module, attr: str, module: str, bf16: nnx.Module, q: Quantization, rules: ShardingRules,
          tp: int, matmul: Fp8MatmulFn) -> None:
    """parent.attr <- its FP8 twin, if its checkpoint modules (beside `module`'s name) are quantized."""
    fused = bf16.weight.get_metadata().get("fused_from")
    names = [f"{module}.{p.name.removesuffix('.weight')}" for p in fused.parts] if fused else [f"{module}.{attr}"]
    converted = [q.converts(name) for name in names]
    if not any(converted):
        return
    if not all(converted):
        raise ValueError(f"{', '.join(names)} are served as one fused projection, so they must all be quantized or "
                         f"all not; the checkpoint's {q.method} config converts only some")
    if q.fp8.weight_scales == "block":
        (bo, bi), k = q.fp8.block, bf16.weight.shape[-1]
        outs = [p.hf_shape[0] for p in fused.parts] if fused else [bf16.weight.shape[0]]
        if k % bi or any(out % bo for out in outs):
            raise ValueError(f"{module}.{attr}: [{', '.join(map(str, outs))}] x {k} weights do not hold whole "
                             f"{bo} x {bi} FP8 blocks")
    twin = nnx.eval_shape(lambda: TWINS[type(bf16)](bf16, q.fp8, matmul))
    groups = twin.weight_scale.shape[-1]
    if groups > 1 and rules.spec(twin.weight_scale.get_metadata()["logical_axes"])[-1] is not None and groups % tp:
        raise ValueError(f"{module}.{attr}: tensor_parallel_size={tp} splits its {groups} blocks of 128 input "
                         "features unevenly (row-parallel block-scaled FP8 layers need the blocks divisible by tp)")
    setattr(parent, attr, twin)


def with_requested_fp8(arch: ModelArch, requested: str) -> ModelArch:
    """Apply `--quantization fp8|fp8_per_tensor|fp8_per_block`: an FP8 checkpoint (quant_method fp8)
    keeps its own scheme; a float checkpoint is quantized at load (dynamic activation scales)."""
    have = arch.quantization
    if have is not None:
        if have.method != "fp8":
            raise ValueError(f"--quantization {requested} does not match the checkpoint's quantization_config "
                             f"(quant_method {have.method})")
        return arch
    return dataclasses.replace(arch, quantization=Quantization("fp8", fp8=Fp8Scheme(FP8_REQUESTS[requested],
                                                                                     online=True)))


# ----------------------------------------------------------------------------------------------
# Loading


class Fp8Checkpoint:
    """A `loader.Checkpoint` that also serves the twins' fields: `X.qweight`, `X.weight_scale` and
    `X.input_scale` of checkpoint module X, in `Fp8Weights`' layout, from X's stored tensors (or
    from its float weight quantized here); every other name as the checkpoint stores it."""

    def __init__(self, checkpoint, scheme: Fp8Scheme):
        self.checkpoint = checkpoint
        self.scheme = scheme

    def stored_name(self, name: str) -> str | None:
        return self.checkpoint.stored_name(name)

    def tensor(self, name: str, shape) -> np.ndarray:
        module, field = name.rsplit(".", 1)
        if field not in FP8_FIELDS:
            return self.checkpoint.tensor(name, shape)
        value = self._field(module, field)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name}: {value.shape} from the checkpoint, expected {tuple(shape)}")
        return value

    def _field(self, module: str, field: str) -> np.ndarray:
        scheme, blocked = self.scheme, self.scheme.weight_scales == "block"
        if field == "input_scale":
            return np.asarray(self._stored(f"{module}.input_scale"), np.float32).reshape(1)
        weight = self._stored(f"{module}.weight")
        if scheme.online:
            values, scale = quantize_blocks(weight, scheme.block) if blocked else quantize_per_tensor(weight)
            return values if field == "qweight" else per_feature_scales(scale, *weight.shape, blocked, scheme.block)
        if field == "qweight":
            if weight.dtype != np.dtype(jnp.float8_e4m3fn):
                raise ValueError(f"{module}.weight is {weight.dtype} in the checkpoint; an FP8 checkpoint's "
                                 "converted modules store float8_e4m3fn")
            return weight
        scale_name = f"{module}.weight_scale_inv" if self.stored_name(f"{module}.weight_scale_inv") else (
            f"{module}.weight_scale")
        return per_feature_scales(self._stored(scale_name), *weight.shape, blocked, scheme.block)

    def _stored(self, name: str) -> np.ndarray:
        stored = self.checkpoint.stored_name(name)
        if stored is None:
            raise ValueError(f"checkpoint has no tensor {name}")
        return self.checkpoint.files[stored].get(stored)


# NOTE: dummy FP8 weights keep a dummy bf16 model's scale (std 0.02): codes of std 64 (well inside e4m3's
# +-448) times scales around 0.02 / 64; static input scales fit activations up to ~4.
DUMMY_CODE_STD = 64.0

# A twin parameter's `init` -> (key, shape, dtype) -> its random value (`--load-format dummy`).
FP8_DUMMY_DRAWS: dict[str, Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]] = {
    "fp8": lambda key, shape, dtype: jnp.clip(DUMMY_CODE_STD * jax.random.normal(key, shape, jnp.float32),
                                              -E4M3_MAX, E4M3_MAX).astype(dtype),
    "fp8_scales": lambda key, shape, dtype: (0.02 / DUMMY_CODE_STD * jax.random.uniform(
        key, shape, jnp.float32, 0.5, 1.5)).astype(dtype),
    "fp8_input_scale": lambda key, shape, dtype: jnp.full(shape, 4.0 / E4M3_MAX, dtype),
}
