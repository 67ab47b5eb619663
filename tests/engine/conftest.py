"""Shared fixtures of the engine tests: the real stories260K tokenizer and small engines over the fake runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import jaxllm
from jaxllm.config import CacheConfig, EngineConfig, EngineLimits, ModelConfig, SchedulerConfig
from jaxllm.engine.core import EngineInfo
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from tests.engine.fake_runner import FakeModelRunner

STORIES = Path(jaxllm.__file__).parent / "data" / "stories260K"
VOCAB_SIZE = 512
EOS_ID = 2


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def make_config(*, block_size: int = 4, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                async_scheduling: bool = False, enable_prefix_caching: bool = True, stream_interval: int = 1,
                seed: int = 0) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(seed=seed),
        cache=CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  async_scheduling=async_scheduling, stream_interval=stream_interval),
    )


def new_llm_engine(tokenizer, runner: FakeModelRunner | None = None, *, max_model_len: int = 128,
                   num_pages: int = 64, log_stats: bool = False, grammar_compiler=None,
                   **config_kwargs) -> LLMEngine:
    """An LLMEngine over a FakeModelRunner (a fresh one by default) with a pool of `num_pages`."""
    config = make_config(**config_kwargs)
    runner = runner or FakeModelRunner(VOCAB_SIZE, config.cache.block_size)
    limits = EngineLimits.given(config, max_model_len=max_model_len, num_pages=num_pages)
    return LLMEngine(config, limits, runner, tokenizer, VOCAB_SIZE, [EOS_ID], log_stats=log_stats,
                     grammar_compiler=grammar_compiler)


MakeEngine = Callable[..., LLMEngine]


@pytest.fixture
def make_engine(tokenizer) -> Iterator[MakeEngine]:
    """Build LLMEngines over a FakeModelRunner; after the test each must be idle with its whole pool free."""
    engines: list[LLMEngine] = []

    def make(runner: FakeModelRunner | None = None, **kwargs) -> LLMEngine:
        engine = new_llm_engine(tokenizer, runner, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
        assert all(count == 0 for count in engine.block_manager.ref_counts)


def add(engine: LLMEngine, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        prompt: str | None = None, cache_salt: str | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
    """Validate and queue a request, as the engine's clients do. A grammar compiles here, at once (the
    engine core compiles it off its loop and decides when it is ready; tests of that drive the core)."""
    params = params.clone(output_kind=output_kind)
    info = EngineInfo.describe(engine)
    engine.add_request(info.new_request(request_id, prompt_token_ids, params, prompt=prompt, cache_salt=cache_salt))
    if params.structured_outputs is not None:
        engine.grammar_ready(request_id, engine.compile_grammar(params))


def step(engine: LLMEngine) -> list[RequestOutput]:
    """One step's outputs, as the caller's `RequestOutput`s (no prompt: the engine keeps none)."""
    return [out.to_request_output(out.request_id, None, []) for out in engine.step()]


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Step until idle; the last output of each request."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for output in step(engine):
            final[output.request_id] = output
    raise AssertionError("the engine did not finish")
