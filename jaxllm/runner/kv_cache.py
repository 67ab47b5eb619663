"""Measure the device, and allocate the KV page pool (its size: `limits.kv_pool`).

On a GPU the pool gets what `gpu_memory_utilization` of the device leaves after the weights and
the largest bucket's activation peak; on CPU (no memory stats), `kv_cache_memory_bytes` (64 MiB
default).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm.model_arch import ModelArch
from jaxllm.models.layers import kv_pages_shape
from jaxllm.models.sharding import ShardingRules, kv_pages_sharding
from jaxllm.runner.limits import DeviceFacts, GiB
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


def allocate_kv_pages(arch: ModelArch, num_pages: int, page_size: int, dtype, mesh, rules) -> list[jax.Array]:
    """One zeroed [2, Hkv, num_pages, page_size, D] array per layer, sharded by KV heads."""
    shape = kv_pages_shape(arch, num_pages, page_size)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_pages_sharding(mesh, rules))
    return [make() for _ in range(arch.num_layers)]


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
