"""POST /v1/completions, shaped as vLLM's (`cmpl-…` ids, `text_completion` objects, SSE chunks)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.outputs import Logprob, RequestOutput
from serve.engine_client import ServingContext
from serve.errors import APIError
from serve.handling import (
    base_request_id,
    check_model,
    collect,
    continuous_usage,
    finish_sse,
    parse,
    start_generation,
    usage,
)
from serve.logprobs import TokenNamer, completion_logprobs
from serve.prompts import EnginePrompt, completion_prompts, resolve_max_tokens
from serve.protocol import CompletionRequest
from serve.sampling import build_sampling_params, reject_unsupported
from serve.streaming import SSEResponse, sse
from serve.structured import check_compiles, requested_structured_outputs


@dataclass
class _Choice:
    """One output sequence (prompt i, sample j) as it accumulates."""

    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0
    started: bool = False


class _Completion:
    """The state of one completions request across its prompts and samples."""

    def __init__(self, ctx: ServingContext, request: CompletionRequest, prompts: list[EnginePrompt], rid: str) -> None:
        self.ctx, self.request, self.prompts, self.id = ctx, request, prompts, rid
        self.created = int(time.time())
        self.n = 1 if request.n is None else request.n
        self.choices = [_Choice(i // self.n) for i in range(len(prompts) * self.n)]
        self.cached_tokens = [0] * len(prompts)
        self.prompt_logprobs: list[list[dict[int, Logprob] | None] | None] = [None] * len(prompts)
        self.name = TokenNamer(ctx.engine.tokenizer, bool(request.return_tokens_as_token_ids))
        self.start = time.perf_counter()

    def update(self, prompt_index: int, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        """Fold one delta output in; returns (choice index, delta text, delta ids, delta logprobs) per sample."""
        self.cached_tokens[prompt_index] = res.num_cached_tokens
        if res.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = res.prompt_logprobs
        deltas = []
        for out in res.outputs:
            if out.finish_reason == "error":
                raise APIError("The engine failed while generating this request.", HTTPStatus.INTERNAL_SERVER_ERROR)
            index = prompt_index * self.n + out.index
            choice = self.choices[index]
            positions = list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)
            choice.text += out.text
            choice.token_ids += out.token_ids
            choice.logprobs += positions
            if out.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
            deltas.append((index, out.text, list(out.token_ids), positions))
        return deltas

    def echo_prefix(self, choice: _Choice) -> tuple[str, list[int], list[dict[int, Logprob] | None]]:
        """Prompt text, ids and logprobs shown before the output when `echo` is on."""
        if not self.request.echo:
            return "", [], []
        prompt = self.prompts[choice.prompt_index]
        text = prompt.text if prompt.text is not None else self.ctx.engine.tokenizer.decode(prompt.token_ids)
        logprobs = self.prompt_logprobs[choice.prompt_index] or [None] * len(prompt.token_ids)
        return text, prompt.token_ids, list(logprobs)

    def logprobs_json(self, choice: _Choice, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        if self.request.logprobs is None:
            return None
        out, choice.text_offset = completion_logprobs(ids, positions, self.request.logprobs, self.name,
                                                      choice.text_offset)
        return out

    def usage(self) -> dict[str, Any]:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return usage(prompt_tokens, sum(len(c.token_ids) for c in self.choices), sum(self.cached_tokens))

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.ctx.model_name, "choices": choices}
        if with_usage:
            body["usage"] = self.usage()
        return body

    def log(self, status: str) -> None:
        self.ctx.log_request(self.id, sum(len(p.token_ids) for p in self.prompts),
                             sum(len(c.token_ids) for c in self.choices), self.start, status)


async def create_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    request = parse(CompletionRequest, body)
    check_model(ctx, request.model)
    reject_unsupported(request)
    if request.suffix is not None:
        raise APIError("suffix is not currently supported.", param="suffix")
    engine = ctx.engine
    prompts = completion_prompts(engine.tokenizer, request.prompt, add_special_tokens=request.add_special_tokens,
                                 vocab_size=engine.vocab_size)
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo and request.logprobs is not None:
        prompt_logprobs = request.logprobs
    structured, param = requested_structured_outputs(request)
    if structured is not None:
        await check_compiles(engine, structured, param)
    params = [
        build_sampling_params(
            request,
            max_tokens=resolve_max_tokens(engine.max_model_len, len(p.token_ids), request.max_tokens, "max_tokens",
                                          ctx.default_sampling.get("max_tokens")),
            logprobs=request.logprobs,
            prompt_logprobs=prompt_logprobs,
            model_defaults=ctx.default_sampling,
            vocab_size=engine.vocab_size,
            structured_outputs=structured,
        )
        for p in prompts
    ]
    state = _Completion(ctx, request, prompts, f"cmpl-{base_request_id(raw, request.request_id)}")
    outputs = await start_generation(ctx, prompts, params, [f"{state.id}-{i}" for i in range(len(prompts))],
                                     request.cache_salt)
    if request.stream:
        return SSEResponse(finish_sse(state, outputs, _chunks(state, outputs)))
    await collect(state, outputs, state.update)
    return JSONResponse(_final_response(state))


def _final_response(state: _Completion) -> dict[str, Any]:
    choices = []
    for index, choice in enumerate(state.choices):
        echo_text, echo_ids, echo_logprobs = state.echo_prefix(choice)
        logprobs = state.logprobs_json(choice, echo_ids + choice.token_ids, echo_logprobs + choice.logprobs)
        choices.append({"index": index, "text": echo_text + choice.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
    body = state.chunk(choices)
    body.update(system_fingerprint=None, service_tier=None, usage=state.usage())
    return body


async def _chunks(state: _Completion, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    continuous = continuous_usage(state.request)
    async for prompt_index, res in outputs:
        for index, text, ids, positions in state.update(prompt_index, res):
            choice = state.choices[index]
            if not choice.started:
                choice.started = True
                echo_text, echo_ids, echo_logprobs = state.echo_prefix(choice)
                text, ids, positions = echo_text + text, echo_ids + ids, echo_logprobs + positions
            if not text and not ids and choice.finish_reason is None:
                continue
            done = choice.finish_reason is not None
            yield sse(state.chunk([{
                "index": index, "text": text, "logprobs": state.logprobs_json(choice, ids, positions),
                "finish_reason": choice.finish_reason if done else None,
                "stop_reason": choice.stop_reason if done else None,
            }], with_usage=continuous))
