"""A real `AsyncEngine` whose device is the hand-computable `FakeModelRunner` (no jax), for server tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jaxllm.config import (
    CacheConfig,
    EngineConfig,
    EngineLimits,
    ModelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
)
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.client import EngineClient
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.generation_config import GenerationDefaults
from jaxllm.structured import make_grammar_compiler
from jaxllm.tokenizer import load_tokenizer
from tests.engine.fake_runner import FakeModelRunner

STORIES = Path(__file__).resolve().parents[2] / "jaxllm" / "data" / "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine."
MODEL_NAMES = ["stories", "stories-alias"]


def new_engine(tokenizer: Any, script: list[int], **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine over a FakeModelRunner that "generates" the token script: the token after a
    context of length L is script[(L + seed) % len(script)], so outputs read as text. Structured outputs
    work (the runner takes the first token the grammar allows at or after the script's)."""
    return AsyncEngine(new_llm_engine(tokenizer, script, **kwargs))


def story_engine_parts(**kwargs: Any) -> SimpleNamespace:
    """A `ProcessEngine` factory (run in the child): `new_engine`'s engine over stories260K's tokenizer
    and the STORY script."""
    tokenizer = load_tokenizer(STORIES)
    engine = new_llm_engine(tokenizer, tokenizer.encode(" " + STORY, add_special_tokens=False), **kwargs)
    return SimpleNamespace(engine=engine, generation_defaults=GenerationDefaults(), chat_template=None,
                           model_type="llama")


def new_llm_engine(tokenizer: Any, script: list[int], *, max_model_len: int = 512, num_pages: int = 512,
                   block_size: int = 16, delay_s: float = 0.001, eos_token_ids: tuple[int, ...] = (2, 1),
                   fail_at_step: int | None = None, grammar_compiler: Any = None, max_logprobs: int = 20,
                   structured_outputs: StructuredOutputsConfig | None = None) -> LLMEngine:
    """`grammar_compiler`: the engine's (default: the real one over `tokenizer`, with `structured_outputs`, the
    --structured-outputs-config); `max_logprobs`: --max-logprobs."""
    config = EngineConfig(
        model=ModelConfig(model=str(STORIES), served_model_name=list(MODEL_NAMES), max_logprobs=max_logprobs),
        cache=CacheConfig(block_size=block_size),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096, async_scheduling=False),
        structured_outputs_config=structured_outputs or StructuredOutputsConfig(),
    )
    runner = FakeModelRunner(len(tokenizer), block_size, next_token_fn=lambda ctx, seed: script[(len(ctx) + seed)
                             % len(script)], delay_s=delay_s, fail_at_step=fail_at_step)
    limits = EngineLimits.given(config, max_model_len=max_model_len, num_pages=num_pages)
    engine = LLMEngine(config, limits, runner, tokenizer, len(tokenizer), eos_token_ids, log_stats=False,
                       grammar_compiler=grammar_compiler or make_grammar_compiler(tokenizer, len(tokenizer),
                                                                                  config.structured_outputs_config))
    return engine


def pool_is_free(engine: EngineClient) -> bool:
    return engine.num_free_pages() == engine.info.limits.num_pages and engine.metrics().num_requests_running == 0
