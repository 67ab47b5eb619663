"""The periodic stats line (vLLM's "Avg prompt throughput: …"), from `AsyncEngine.metrics()` deltas."""

from __future__ import annotations

import asyncio
import logging
import time

from serve.engine_client import EngineClient

logger = logging.getLogger("jaxllm.serve.stats")

STATS_INTERVAL_S = 10.0


async def log_stats_forever(engine: EngineClient, interval_s: float = STATS_INTERVAL_S) -> None:
    last = engine.metrics()
    last_time = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, now_time = engine.metrics(), time.monotonic()
        elapsed = max(now_time - last_time, 1e-9)
        prompt_tps = (now.prompt_tokens_total - last.prompt_tokens_total) / elapsed
        gen_tps = (now.generation_tokens_total - last.generation_tokens_total) / elapsed
        queries = now.prefix_cache_queries_total - last.prefix_cache_queries_total
        hits = now.prefix_cache_hits_total - last.prefix_cache_hits_total
        busy = prompt_tps or gen_tps or now.num_requests_running or now.num_requests_waiting
        # NOTE: an idle server stays quiet (debug level), as vLLM's logger does.
        logger.log(
            logging.INFO if busy else logging.DEBUG,
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            prompt_tps, gen_tps, now.num_requests_running, now.num_requests_waiting, 100 * now.kv_cache_usage,
            100 * hits / queries if queries else 0.0,
        )
        last, last_time = now, now_time
