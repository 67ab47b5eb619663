"""Size and allocate the KV page pool.

On a GPU: what `gpu_memory_utilization` of the device leaves after the weights and the largest
bucket's activation peak. On CPU (no memory stats): `kv_cache_memory_bytes` (64 MiB default).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import CPU_KV_CACHE_BYTES, CacheConfig
from jaxllm.model_arch import ModelArch
from jaxllm.models.llama import kv_pages_shape
from jaxllm.models.sharding import ShardingRules, kv_pages_sharding

logger = logging.getLogger(__name__)

GiB = 1 << 30


def bytes_per_page(arch: ModelArch, page_size: int, dtype, tp: int, rules: ShardingRules) -> int:
    """KV bytes of one page across all layers, on one device."""
    kv_heads = arch.num_kv_heads // tp if rules.kv_heads is not None else arch.num_kv_heads
    return arch.num_layers * 2 * kv_heads * page_size * arch.head_dim * np.dtype(dtype).itemsize


def device_memory(device) -> tuple[int, int] | None:
    """(bytes this process may use, bytes in use now), or None where the device reports nothing (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def kv_budget_bytes(cache: CacheConfig, device, activation_bytes: int, total_device_bytes: int | None) -> int:
    """Bytes (per device) the page pool may take."""
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    mem = device_memory(device)
    if mem is None:
        return CPU_KV_CACHE_BYTES
    limit, in_use = mem
    total = total_device_bytes or limit
    allowed = min(int(total * cache.gpu_memory_utilization), limit)
    return max(allowed - in_use - activation_bytes, 0)


def num_pages_for(cache: CacheConfig, budget_bytes: int, page_bytes: int) -> int:
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    return budget_bytes // page_bytes


def check_fits(num_pages: int, page_size: int, max_model_len: int, page_bytes: int, budget_bytes: int) -> None:
    """Fail at startup, with vLLM's message and the numbers, when one max_model_len request cannot fit."""
    if num_pages * page_size >= max_model_len:
        return
    needed = math.ceil(max_model_len / page_size) * page_bytes
    estimated = num_pages * page_size
    raise ValueError(
        f"To serve at least one request with the models's max seq len ({max_model_len}), "
        f"({needed / GiB:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
        f"({budget_bytes / GiB:.2f} GiB). Based on the available memory, the estimated maximum model length is "
        f"{estimated}. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing "
        "the engine."
    )


def allocate_kv_pages(arch: ModelArch, num_pages: int, page_size: int, dtype, mesh, rules) -> list[jax.Array]:
    """One zeroed [2, Hkv, num_pages, page_size, D] array per layer, sharded by KV heads."""
    shape = kv_pages_shape(arch, num_pages, page_size)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_pages_sharding(mesh, rules))
    return [make() for _ in range(arch.num_layers)]


def log_pool(num_pages: int, page_size: int, max_model_len: int, page_bytes: int) -> None:
    tokens = num_pages * page_size
    logger.info(
        "KV cache: %d pages of %d tokens = %d tokens (%.2f GiB per device); maximum concurrency for %d tokens "
        "per request: %.2fx",
        num_pages, page_size, tokens, num_pages * page_bytes / GiB, max_model_len, tokens / max_model_len,
    )
