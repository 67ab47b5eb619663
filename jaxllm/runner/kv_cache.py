"""Measure the device, and allocate the KV page pool (its size: `limits.kv_pool`).

On a GPU the pool gets what `gpu_memory_utilization` of the device leaves after the weights and
the largest bucket's activation peak; on CPU (no memory stats), `kv_cache_memory_bytes` (64 MiB
default).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import CacheConfig
from jaxllm.model_arch import ARCHITECTURES, ModelArch
from jaxllm.models.kv_scales import UNCALIBRATED, ScaledKvPages, read_checkpoint_kv_scales
from jaxllm.models.layers import kv_pages_shape
from jaxllm.models.loader import open_checkpoint
from jaxllm.models.sharding import ShardingRules, kv_pages_sharding
from jaxllm.runner.limits import DeviceFacts, GiB
from jaxllm.runner.model_loading import LoadedModel
from pallas_kernels.ragged_paged_attention.common import FP8_KV_DTYPE

logger = logging.getLogger(__name__)


def kv_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The pages' dtype for `--kv-cache-dtype`: auto keeps the model's, fp8 / fp8_e4m3 store e4m3
    (ragged_paged_attention/common.py's FP8 pages)."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(model_dtype)
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return jnp.dtype(FP8_KV_DTYPE)
    raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported (auto, fp8, fp8_e4m3)")


@dataclass(frozen=True)
class KvFormat:
    """What each layer's KV state holds: pages of `dtype`, and where `scales` is given, FP8 pages with their
    scales beside them (`ScaledKvPages`), starting at `scales` [L, 2] (k_scale, v_scale) per layer
    (UNCALIBRATED: measured by the first step). Without, FP8 scales are AttentionParams' static 1.0."""

    dtype: jnp.dtype
    scales: tuple[tuple[float, float], ...] | None = None


def kv_format(cache: CacheConfig, model: LoadedModel, load_format: str) -> KvFormat:
    """The pool's format for `--kv-cache-dtype` and `--calculate-kv-scales`: FP8 pages take their scales from
    the first step with the flag (vLLM ignores a checkpoint's scales then too), else from the checkpoint
    where it has them (`models/kv_scales.py`)."""
    dtype = kv_dtype(cache.kv_cache_dtype, model.dtype)
    if dtype != jnp.dtype(FP8_KV_DTYPE):
        if cache.calculate_kv_scales:
            logger.warning("--calculate-kv-scales has no effect on %s KV pages (it calibrates --kv-cache-dtype fp8)",
                           dtype.name)
        return KvFormat(dtype)
    scales = None
    if cache.calculate_kv_scales:
        scales = np.full((model.arch.num_layers, 2), UNCALIBRATED, np.float32)
    elif load_format != "dummy":
        names = ARCHITECTURES[model.arch.architecture].names
        scales = read_checkpoint_kv_scales(open_checkpoint(model.model_dir, names), model.arch.num_layers)
    if scales is None:
        return KvFormat(dtype)
    if model.arch.mla is not None:
        raise ValueError("FP8 KV scales beside the pages (--calculate-kv-scales, or a checkpoint's k_scale / "
                         "v_scale) are not supported on MLA latent pages")
    logger.info("FP8 KV scales: %s", "calibrated by the first step" if cache.calculate_kv_scales
                else "the checkpoint's, per layer")
    return KvFormat(dtype, tuple((float(k), float(v)) for k, v in scales))


def bytes_per_page(arch: ModelArch, page_size: int, dtype, tp: int, rules: ShardingRules) -> int:
    """KV bytes of one page across all layers, on one device."""
    if arch.mla is not None:  # one latent row per token, on every device
        return arch.num_layers * page_size * arch.mla.latent_width * np.dtype(dtype).itemsize
    kv_heads = arch.num_kv_heads // tp if rules.kv_heads is not None else arch.num_kv_heads
    return arch.num_layers * 2 * kv_heads * page_size * arch.head_dim * np.dtype(dtype).itemsize


def measure_device(mesh: Mesh) -> DeviceFacts:
    """The platform, mesh size and memory of one device this process holds (multi-process: its own)."""
    device = mesh.local_devices[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return DeviceFacts(device.platform, mesh.devices.size)
    limit = int(stats["bytes_limit"])
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))  # jax's share of the device
    return DeviceFacts(device.platform, mesh.devices.size, limit, int(stats.get("bytes_in_use", 0)),
                       int(limit / fraction))


def same_on_every_process(num_pages: int) -> int:
    """The smallest pool any process can hold: every process must run the same program on the
    same pool, and each measured its own free memory."""
    if jax.process_count() == 1:
        return num_pages
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(num_pages, np.int64))))


def layer_state_spec(arch: ModelArch, num_pages: int, page_size: int, fmt: KvFormat, mesh: Mesh,
                     rules: ShardingRules) -> jax.ShapeDtypeStruct | ScaledKvPages:
    """One layer's KV state as shapes and shardings: its pages, or with `fmt.scales` a `ScaledKvPages` of
    them and its [2] f32 scales (replicated)."""
    pages = jax.ShapeDtypeStruct(kv_pages_shape(arch, num_pages, page_size), fmt.dtype,
                                 sharding=kv_pages_sharding(mesh, rules))
    if fmt.scales is None:
        return pages
    return ScaledKvPages(pages, jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())))


def allocate_kv_pages(arch: ModelArch, num_pages: int, page_size: int, fmt: KvFormat, mesh,
                      rules) -> list[jax.Array | ScaledKvPages]:
    """One zeroed [2, Hkv, num_pages, page_size, D] array per layer, sharded by KV heads; with `fmt.scales`,
    each beside its layer's starting scales."""
    spec = layer_state_spec(arch, num_pages, page_size, fmt, mesh, rules)
    if fmt.scales is None:
        make = jax.jit(lambda: jnp.zeros(spec.shape, spec.dtype), out_shardings=spec.sharding)
        return [make() for _ in range(arch.num_layers)]
    make_pages = jax.jit(lambda: jnp.zeros(spec.pages.shape, spec.pages.dtype), out_shardings=spec.pages.sharding)
    make_scales = jax.jit(lambda s: s, out_shardings=spec.scales.sharding)
    return [ScaledKvPages(make_pages(), make_scales(np.asarray(s, np.float32))) for s in fmt.scales]


def log_pool(num_pages: int, page_size: int, max_model_len: int, page_bytes: int, activation_bytes: int,
             dtype) -> None:
    """The KV phase's one start-up line; `activation_bytes`, the peak it reserved (0: not measured, CPU)."""
    tokens = num_pages * page_size
    logger.info(
        "KV cache: %d pages of %d tokens = %d tokens (%s, %.2f GiB per device%s); maximum concurrency for %d "
        "tokens per request: %.2fx",
        num_pages, page_size, tokens, jnp.dtype(dtype).name, num_pages * page_bytes / GiB,
        f", after {activation_bytes / GiB:.2f} GiB of activation peak" if activation_bytes else "",
        max_model_len, tokens / max_model_len,
    )
