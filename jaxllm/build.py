"""Assembling an engine: load the model, resolve the limits, compile, and wire the engine around it.

The one place that builds an `LLMEngine` with a real runner, for the offline API (`jaxllm.llm`) and
for the server's engine (`jaxllm.serving`, in the engine process or on a thread).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from jaxllm.config import EngineConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.generation_config import GenerationDefaults, load_generation_defaults
from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import load_tokenizer, resolve_chat_template

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    engine: LLMEngine
    generation_defaults: GenerationDefaults
    chat_template: str | None


def build_engine(config: EngineConfig, *, served: bool = False, log_stats: bool = False) -> EngineParts:
    """Load the model, compile it, size the KV pool and wire the engine around it."""
    # The only jax imports on this path:
    from jaxllm import distributed  # noqa: PLC0415
    from jaxllm.models.loader import resolve_model_dir  # noqa: PLC0415
    from jaxllm.runner.model_runner import ModelRunner  # noqa: PLC0415

    distributed.initialize(config.parallel)  # before any device is touched
    model_dir = resolve_model_dir(config.model.model, config.model.revision)
    defaults = load_generation_defaults(model_dir, config.model.generation_config, config.model.revision)
    runner = ModelRunner(config, served=served, default_sampling=_default_sampling(defaults))
    tokenizer = load_tokenizer(config.model.tokenizer or model_dir, config.model.revision)
    eos = set(defaults.eos_token_ids) | set(runner.model.arch.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = LLMEngine(
        config, runner.limits, runner, tokenizer, runner.vocab_size, sorted(eos),
        log_stats=log_stats, grammar_compiler=_grammar_compiler(tokenizer, runner.vocab_size),
    )
    parts = EngineParts(engine, defaults, resolve_chat_template(config.model.chat_template))
    freeze_startup_heap()
    runner.load_in_background()  # served: the buckets the warmup left
    return parts


def _default_sampling(defaults: GenerationDefaults) -> SamplingParams | None:
    """The default sampling params, for warmup; None (and requests will say why) when invalid."""
    try:
        return SamplingParams(**defaults.sampling)
    except (TypeError, ValueError) as exc:
        logger.warning("The generation config's sampling defaults %s are not valid: %s", defaults.sampling, exc)
        return None


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (model tree, tokenizer tables, compiled executables) out
    of the garbage collector's reach.

    NOTE: a full collection otherwise walks that heap again and again while requests run: over 150
    host steps of 1024 requests (bench/host_overhead.py on the CPU machine) 3 of them took 770 ms
    (up to 268 ms each), every one a stall of the device; with the heap frozen before the requests
    came, 5 took 111 ms and the host step went from 26.7 to 20.3 ms. (vLLM tunes its engine's
    collector for the same reason.)"""
    gc.collect()
    gc.freeze()


def _grammar_compiler(tokenizer, vocab_size: int):
    """Structured outputs, when the grammar package is installed (None otherwise)."""
    try:
        from jaxllm.structured import make_grammar_compiler
    except ImportError:
        return None
    return make_grammar_compiler(tokenizer, vocab_size)
