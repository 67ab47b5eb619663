"""The engine's limits, resolved from the config and what was measured, by pure functions.

    build_engine: load the model -> measure the device (DeviceFacts)
        -> scheduler_limits(config, device, context length)           budgets (scheduler_defaults),
                                                                       token buckets, async scheduling
        -> the largest bucket's activation peak, the KV page's bytes  (measured by the runner side)
        -> kv_pool(cache config, device, reserved bytes, page bytes)  pages from the memory left
        -> resolve_limits(...)                                        one EngineLimits for the engine

No jax and no device here: the measurements come in as numbers, so every rule is testable alone,
and nothing is written back into the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxllm.config import CPU_KV_CACHE_BYTES, CacheConfig, EngineConfig, EngineLimits

GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """One device of this process, measured once the weights are on it."""

    platform: str  # "gpu", "cpu", ...
    num_devices: int  # devices of the model's mesh
    memory_limit: int | None = None  # bytes this process may use on it; None where it reports nothing (CPU)
    memory_in_use: int = 0  # bytes in use now (the weights)
    total_bytes: int | None = None  # its whole memory (vLLM's budgets and gpu_memory_utilization are of this)


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """The limits known before the KV pool is sized: they decide the buckets, whose activations the
    pool must leave room for."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    token_buckets: tuple[int, ...]  # ascending
    async_scheduling: bool


@dataclass(frozen=True, slots=True)
class KVPool:
    num_pages: int
    page_bytes: int  # one page across all layers, on one device
    budget_bytes: int  # what the pool may take on one device


def token_buckets(max_tokens: int, max_num_seqs: int = 0, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to the step budget (which is always a bucket), and every
    multiple of 128 between 256 and min(1024, max_num_seqs).

    NOTE: an 8B decode step is bound by its weights' read below ~200 tokens and by its matmuls
    above, where padding costs its share; decode-only batches (at most max_num_seqs tokens) land
    anywhere in 256-1024 as requests finish, and a power-of-two bucket pads them by a quarter on
    average, 128-token steps by far less. Prefill chunks fill the step budget, so larger buckets
    stay powers of two."""
    out, b = [], smallest
    while b < max_tokens:
        out.append(b)
        b *= 2
    out += range(256 + 128, min(1024, max_num_seqs, max_tokens), 128)
    return sorted({*out, max_tokens})


def max_model_len(wanted: int | None, max_position_embeddings: int) -> int:
    """The context length: the config's, or the model's when unset; more than the model's is an error."""
    if wanted is None:
        return max_position_embeddings
    if wanted > max_position_embeddings:
        raise ValueError(
            f"max_model_len ({wanted}) is greater than the derived max_model_len (max_position_embeddings="
            f"{max_position_embeddings} in the model's config.json)."
        )
    return wanted


def scheduler_limits(config: EngineConfig, device: DeviceFacts, max_position_embeddings: int, *,
                     served: bool) -> SchedulerLimits:
    """The config's scheduler values, the open ones filled from the device's defaults."""
    sched = config.scheduler
    default_seqs, default_tokens = scheduler_defaults(device.platform, device.total_bytes, served)
    max_num_seqs = sched.max_num_seqs or default_seqs
    max_tokens = sched.max_num_batched_tokens or max(default_tokens, 16)
    buckets = sorted(set(sched.token_buckets)) or token_buckets(max_tokens, max_num_seqs)
    if buckets[-1] < max_tokens:
        buckets.append(max_tokens)
    async_scheduling = sched.async_scheduling
    if async_scheduling is None:
        async_scheduling = device.platform != "cpu" or device.num_devices == 1
    return SchedulerLimits(max_model_len(config.model.max_model_len, max_position_embeddings), max_num_seqs,
                           max_tokens, tuple(buckets), async_scheduling)


def kv_budget_bytes(cache: CacheConfig, device: DeviceFacts, reserved_bytes: int) -> int:
    """Bytes (per device) the page pool may take: `gpu_memory_utilization` of the device less what
    is in use and `reserved_bytes` (the step's activations and input buffers)."""
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    if device.memory_limit is None:
        return CPU_KV_CACHE_BYTES
    total = device.total_bytes or device.memory_limit
    allowed = min(int(total * cache.gpu_memory_utilization), device.memory_limit)
    return max(allowed - device.memory_in_use - reserved_bytes, 0)


def kv_pool(cache: CacheConfig, device: DeviceFacts, reserved_bytes: int, page_bytes: int) -> KVPool:
    """The pages the budget holds (or `num_gpu_blocks_override`)."""
    budget = kv_budget_bytes(cache, device, reserved_bytes)
    num_pages = cache.num_gpu_blocks_override
    if num_pages is None:
        num_pages = budget // page_bytes
    return KVPool(num_pages, page_bytes, budget)


def resolve_limits(sched: SchedulerLimits, block_size: int, pool: KVPool) -> EngineLimits:
    """The engine's limits; fails, with vLLM's message and the numbers, when one max_model_len
    request cannot fit the pool."""
    if pool.num_pages * block_size < sched.max_model_len:
        needed = math.ceil(sched.max_model_len / block_size) * pool.page_bytes
        raise ValueError(
            f"To serve at least one request with the models's max seq len ({sched.max_model_len}), "
            f"({needed / GiB:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({pool.budget_bytes / GiB:.2f} GiB). Based on the available memory, the estimated maximum model "
            f"length is {pool.num_pages * block_size}. Try increasing `gpu_memory_utilization` or decreasing "
            "`max_model_len` when initializing the engine."
        )
    return EngineLimits(
        max_model_len=sched.max_model_len, block_size=block_size, num_pages=pool.num_pages,
        max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
        token_buckets=sched.token_buckets, async_scheduling=sched.async_scheduling,
    )


def scheduler_defaults(platform: str, device_memory_bytes: int | None, served: bool) -> tuple[int, int]:
    """vLLM's defaults for (max_num_seqs, max_num_batched_tokens) on this device.

    GPUs with >= 70 GiB: 1024 sequences and 16384 tokens offline / 8192 served; smaller GPUs
    256 / 2048; CPU: small values that keep compiles few and tests fast.
    """
    if platform == "cpu":
        return 16, 256
    if device_memory_bytes is not None and device_memory_bytes >= 70 * 2**30:
        return 1024, (8192 if served else 16384)
    return 256, 2048
