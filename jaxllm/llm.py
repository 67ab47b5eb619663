"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, `.chat(...)`, as vLLM's."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxllm.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from jaxllm.build import build_engine
from jaxllm.config import EngineConfig
from jaxllm.engine.core import Abort, CommandQueue, EngineCore, EngineInfo
from jaxllm.outputs import EngineOutput, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.tokenizer import apply_chat_template, encode_prompt, resolve_chat_template

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


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
        self.info = EngineInfo.describe(parts.engine, parts.generation_defaults.sampling, parts.chat_template,
                                        parts.model_type)
        # NOTE: processes of a multi-process run have no channel to agree on when a grammar compile has
        # ended, so there each request waits for its own.
        self._core = EngineCore(parts.engine, wait_for_grammars=self.engine.config.parallel.num_processes > 1)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.info.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.info.default_sampling)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """A prompt is a string or {"prompt_token_ids": [...]} (optionally with "prompt"). Every request is
        validated before any runs (`jaxllm.validation.ValidationError`). A request that fails in the engine
        (a grammar that does not compile) has finish_reason "error" and its `error` set."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        requests = []
        for prompt, sp in zip(prompts, params, strict=True):
            text, token_ids = self._tokenize(prompt)
            sp = sp.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            requests.append(self.info.new_request(str(next(self._ids)), token_ids, sp, prompt=text))
        commands = CommandQueue()
        commands.put(*requests)
        # NOTE: in a multi-process run every process returns the same outputs; only process 0 shows progress.
        show = use_tqdm and self.engine.config.parallel.process_id == 0
        bar = tqdm(total=len(requests), desc="Processed prompts", unit="req", disable=not show)
        finished: dict[str, RequestOutput] = {}
        wanted = {r.request_id: r for r in requests}

        def collect(outputs: list[EngineOutput]) -> None:
            for out in outputs:
                request = wanted.get(out.request_id)
                if out.finished and request is not None and out.request_id not in finished:
                    finished[out.request_id] = out.to_request_output(out.request_id, request.prompt,
                                                                     request.prompt_token_ids)
                    bar.update(1)

        try:
            self._core.run(commands, collect, until_idle=True)
        except BaseException:
            commands.put(Abort(tuple(wanted)))
            self._core.run(commands, lambda outputs: None, until_idle=True)
            raise
        finally:
            bar.close()
        return [finished[r.request_id] for r in requests]

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search (`jaxllm.beam_search`): per prompt, the `beam_width` best sequences, best first. As in
        vLLM, a sequence's `tokens` and `text` begin with the prompt's. Each step runs every live beam as a
        request for one token; beams share their prompt's (and parent's) KV pages through the prefix cache.
        `concurrency_limit`: search that many prompts at a time (all at once by default)."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        searches = [BeamSearch(self._tokenize(prompt)[1], params, self.info.eos_token_ids, self.info.max_model_len)
                    for prompt in prompts]
        batch_size = concurrency_limit or len(searches)
        show = use_tqdm and self.engine.config.parallel.process_id == 0
        for start in range(0, len(searches), batch_size):
            with tqdm(total=params.max_tokens, desc="Beam search", unit="token", disable=not show) as bar:
                self._search_beams(searches[start:start + batch_size], params.step_params(), bar)
        results = []
        for search in searches:
            best = search.best()
            for beam in best:
                beam.text = self.info.tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens)
            results.append(BeamSearchOutput(best))
        return results

    def _search_beams(self, searches: list[BeamSearch], step_params: SamplingParams, bar: tqdm) -> None:
        """Step the searches together until each is done: every live beam of theirs is one request per step."""
        while running := [search for search in searches if not search.done]:
            beams = [beam for search in running for beam in search.live]
            outputs = self.generate([{"prompt_token_ids": beam.tokens} for beam in beams], step_params, use_tqdm=False)
            next_token_logprobs = iter(out.outputs[0].logprobs[0] for out in outputs)
            for search in running:
                search.advance([next(next_token_logprobs) for _ in search.live])
            bar.update(1)

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
        tokenizer = self.info.tokenizer
        prompts = []
        for conversation in conversations:
            text = apply_chat_template(
                tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                chat_template=resolve_chat_template(chat_template) or self.info.chat_template,
                chat_template_kwargs=chat_template_kwargs,
            )
            ids = encode_prompt(tokenizer, text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, encode_prompt(self.info.tokenizer, prompt, add_special_tokens=True)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], encode_prompt(self.info.tokenizer, prompt["prompt"], add_special_tokens=True)
        raise ValueError("a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids'")
