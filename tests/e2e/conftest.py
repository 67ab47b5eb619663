"""Warmed real engines on CPU, shared across the end-to-end tests (compiles are the cost)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import pytest

from jaxllm import LLM
from jaxllm.config import DEFAULT_MODEL

COMMON = dict(dtype="float32", compilation_cache_dir="", seed=0)


@pytest.fixture(scope="session")
def llm():
    """stories260K; 64 requests fit one step; async scheduling (one CPU device)."""
    return LLM(DEFAULT_MODEL, max_num_seqs=64, max_num_batched_tokens=128, token_buckets=[16, 64, 128], **COMMON)


@pytest.fixture(scope="session")
def small_llm():
    """Tiny budget (chunked prefill) and a tiny pool (preemption), synchronous scheduling; --max-logprobs -1
    (whole-vocabulary logprobs)."""
    return LLM(DEFAULT_MODEL, max_num_seqs=16, max_num_batched_tokens=16, token_buckets=[16],
               num_gpu_blocks_override=40, async_scheduling=False, max_logprobs=-1, **COMMON)


def assert_pool_free(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_pages, f"{bm.num_pages - bm.num_free_pages} pages leaked"


@contextlib.contextmanager
def backend_compiles() -> Iterator[list[float]]:
    """The durations of the XLA compiles that happen inside the block (filled as they happen)."""
    compiles: list[float] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
