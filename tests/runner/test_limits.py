"""The engine's limits resolved from the config and measured numbers (jaxllm.runner.limits): no device."""

from __future__ import annotations

import pytest

from jaxllm.config import CPU_KV_CACHE_BYTES, EngineConfig
from jaxllm.runner.limits import DeviceFacts, KVPool, kv_pool, resolve_limits, scheduler_limits, token_buckets

GiB = 1 << 30
CPU = DeviceFacts("cpu", num_devices=1)
H100 = DeviceFacts("gpu", num_devices=1, memory_limit=76 * GiB, memory_in_use=16 * GiB, total_bytes=80 * GiB)


def test_open_scheduler_values_take_the_devices_defaults():
    cpu = scheduler_limits(EngineConfig(), CPU, 2048, served=False)
    assert (cpu.max_model_len, cpu.max_num_seqs, cpu.max_num_batched_tokens) == (2048, 16, 256)
    assert cpu.token_buckets == tuple(token_buckets(256, 16)) and cpu.async_scheduling
    offline = scheduler_limits(EngineConfig(), H100, 8192, served=False)
    served = scheduler_limits(EngineConfig(), H100, 8192, served=True)
    assert (offline.max_num_seqs, offline.max_num_batched_tokens, served.max_num_batched_tokens) == (1024, 16384, 8192)
    assert offline.token_buckets[-1] == 16384
    small_gpu = DeviceFacts("gpu", 1, memory_limit=20 * GiB, total_bytes=24 * GiB)
    assert scheduler_limits(EngineConfig(), small_gpu, 8192, served=False).max_num_seqs == 256


def test_async_scheduling_defaults_off_only_on_a_cpu_mesh():
    config = EngineConfig()
    assert not scheduler_limits(config, DeviceFacts("cpu", 2), 512, served=False).async_scheduling
    assert scheduler_limits(config, DeviceFacts("gpu", 2), 512, served=False).async_scheduling
    forced = EngineConfig.from_kwargs(async_scheduling=False)
    assert not scheduler_limits(forced, CPU, 512, served=False).async_scheduling


def test_given_values_win_and_the_budget_is_always_a_bucket():
    config = EngineConfig.from_kwargs(max_num_seqs=8, max_num_batched_tokens=100, token_buckets=[32, 16, 32],
                                      max_model_len=300)
    sched = scheduler_limits(config, H100, 512, served=True)
    assert (sched.max_model_len, sched.max_num_seqs, sched.max_num_batched_tokens) == (300, 8, 100)
    assert sched.token_buckets == (16, 32, 100)


def test_a_context_longer_than_the_models_is_an_error():
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        scheduler_limits(EngineConfig.from_kwargs(max_model_len=4096), CPU, 2048, served=False)


def test_the_pool_takes_what_the_utilization_leaves():
    cache = EngineConfig().cache  # gpu_memory_utilization 0.9
    pool = kv_pool(cache, H100, reserved_bytes=2 * GiB, page_bytes=GiB // 8)
    assert pool.budget_bytes == min(int(80 * GiB * 0.9), 76 * GiB) - 16 * GiB - 2 * GiB
    assert pool.num_pages == pool.budget_bytes // (GiB // 8)
    assert kv_pool(cache, CPU, 2 * GiB, 1024).budget_bytes == CPU_KV_CACHE_BYTES  # no memory stats
    assert kv_pool(cache, DeviceFacts("gpu", 1, 10 * GiB, 9 * GiB, 12 * GiB), GiB, 1024).num_pages == 0


def test_explicit_sizes_override_the_measured_budget():
    by_bytes = EngineConfig.from_kwargs(kv_cache_memory_bytes=4096).cache
    assert kv_pool(by_bytes, H100, GiB, 1024) == KVPool(4, 1024, 4096)
    by_pages = EngineConfig.from_kwargs(num_gpu_blocks_override=40).cache
    assert kv_pool(by_pages, H100, GiB, 1024).num_pages == 40


def test_limits_need_room_for_one_longest_request():
    sched = scheduler_limits(EngineConfig.from_kwargs(max_model_len=256), CPU, 2048, served=False)
    limits = resolve_limits(sched, 16, KVPool(num_pages=16, page_bytes=1024, budget_bytes=16 * 1024))
    assert (limits.num_pages, limits.block_size, limits.max_model_len) == (16, 16, 256)
    assert limits.token_buckets == sched.token_buckets and limits.max_num_seqs == sched.max_num_seqs
    with pytest.raises(ValueError, match="estimated maximum model length is 240"):
        resolve_limits(sched, 16, KVPool(num_pages=15, page_bytes=1024, budget_bytes=15 * 1024))
