"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, `.chat(...)`, as vLLM's.

Also the one place that assembles an engine (runner + tokenizer + generation defaults), used by
the offline API and by `python -m jaxllm.serve`.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.generation_config import GenerationDefaults, load_generation_defaults
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import apply_chat_template, encode_prompt, load_tokenizer, resolve_chat_template

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


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
    config = runner.config  # resolved: max_model_len, budgets, number of pages
    tokenizer = load_tokenizer(config.model.tokenizer or model_dir, config.model.revision)
    eos = set(defaults.eos_token_ids) | set(runner.model.arch.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = LLMEngine(
        config, runner, tokenizer, runner.max_model_len, runner.vocab_size, sorted(eos),
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


class LLM:
    """Offline batch generation with vLLM's interface.

    `LLM(model=..., tokenizer=..., dtype=..., max_model_len=..., gpu_memory_utilization=...,
    max_num_seqs=..., max_num_batched_tokens=..., tensor_parallel_size=..., seed=...,
    load_format=..., enable_prefix_caching=...)`: any EngineConfig option by name.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        if model is not None:
            kwargs["model"] = model
        parts = build_engine(EngineConfig.from_kwargs(**kwargs), served=False)
        self.engine = parts.engine
        self.generation_defaults = parts.generation_defaults
        self.chat_template = parts.chat_template
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.generation_defaults.sampling)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """A prompt is a string or {"prompt_token_ids": [...]} (optionally with "prompt")."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        order: list[str] = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                text, token_ids = self._tokenize(prompt)
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, token_ids, sp, prompt=text, final_only=True)
                order.append(request_id)
            return self._run(order, use_tqdm)
        except BaseException:
            self.engine.abort_request(order)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations. `tools` (OpenAI's function
        tools) reach the chat template; assistant tool calls fed back may carry their `arguments` as
        JSON text, as the server returns them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = apply_chat_template(
                tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                chat_template=resolve_chat_template(chat_template) or self.chat_template,
                chat_template_kwargs=chat_template_kwargs,
            )
            ids = encode_prompt(tokenizer, text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, encode_prompt(self.engine.tokenizer, prompt, add_special_tokens=True)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], encode_prompt(self.engine.tokenizer, prompt["prompt"], add_special_tokens=True)
        raise ValueError("a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids'")

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(order)
        # NOTE: in a multi-process run every process returns the same outputs; only process 0 shows progress.
        show = use_tqdm and self.engine.config.parallel.process_id == 0
        bar = tqdm(total=len(order), desc="Processed prompts", unit="req", disable=not show)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted and out.request_id not in finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[r] for r in order]
