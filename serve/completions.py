"""POST /v1/completions, shaped as vLLM's (`cmpl-…` ids, `text_completion` objects, SSE chunks).

    request -> prompts + sampling params (serve.inputs) -> generation (one engine request per prompt)
            -> chunks (streamed) or the whole reply (serve.streaming) -> response
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.outputs import Logprob, RequestOutput
from serve.beam_search import check_completion_beam_search, start_beam_search
from serve.errors import APIError
from serve.inputs import (
    EnginePrompt,
    base_request_id,
    build_sampling_params,
    check_compiles,
    check_model,
    completion_prompts,
    parse,
    reject_unsupported,
    requested_structured_outputs,
    truncate_prompt,
)
from serve.logprobs import TokenNamer, completion_logprobs, prompt_logprobs_json, top_count
from serve.prompt_length import input_char_limit
from serve.protocol import CompletionRequest
from serve.request_bounds import check_prompt_tokens
from serve.request_metrics import reply_metrics
from serve.streaming import RequestLog, SSEResponse, collect, start_generation, to_sse
from serve.usage import final_usage_chunk, stream_usage, usage

if TYPE_CHECKING:
    from serve.app import ServingContext
    from serve.args import ServerArgs


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


class _Reply:
    """The completion reply being built, across its prompts and samples."""

    def __init__(self, request: CompletionRequest, prompts: list[EnginePrompt], rid: str, model_name: str,
                 tokenizer: Any, args: ServerArgs) -> None:
        self.request, self.prompts, self.id, self.model_name = request, prompts, rid, model_name
        self.tokenizer, self.args = tokenizer, args
        self.created = int(time.time())
        self.n = 1 if request.n is None else request.n
        self.choices = [_Choice(i // self.n) for i in range(len(prompts) * self.n)]
        self.cached_tokens = [0] * len(prompts)
        self.prompt_logprobs: list[list[dict[int, Logprob] | None] | None] = [None] * len(prompts)
        self.timings: dict[str, float] = {}
        self.name = TokenNamer.of(tokenizer, request.return_tokens_as_token_ids, args.return_tokens_as_token_ids)
        self.num_top = top_count(request.logprobs, token_ids_listed=bool(request.logprob_token_ids))
        self.token_ids_wanted = bool(request.return_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def update(self, prompt_index: int, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        """Fold one delta output in; returns (choice index, delta text, delta ids, delta logprobs) per sample."""
        self.cached_tokens[prompt_index] = res.num_cached_tokens
        if res.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = res.prompt_logprobs
        self.timings = res.metrics or self.timings
        deltas = []
        for out in res.outputs:
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
        """Prompt text, ids and logprobs shown before the output when `echo` is on (vLLM's: no text when the
        request asks for token ids)."""
        if not self.request.echo:
            return "", [], []
        prompt = self.prompts[choice.prompt_index]
        if self.token_ids_wanted:
            text = ""
        else:
            text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
        logprobs = self.prompt_logprobs[choice.prompt_index] or [None] * len(prompt.token_ids)
        return text, prompt.token_ids, list(logprobs)

    def logprobs_json(self, choice: _Choice, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        if self.request.logprobs is None:
            return None
        out, choice.text_offset = completion_logprobs(ids, positions, self.num_top, self.name, choice.text_offset)
        return out

    def usage(self) -> dict[str, Any]:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        cached = sum(self.cached_tokens) if self.args.enable_prompt_tokens_details else None
        return usage(prompt_tokens, self.num_output_tokens, cached_tokens=cached)

    def choice_usage(self, choice: _Choice) -> dict[str, Any]:
        """A streamed chunk's running usage (vLLM's continuous usage stats): its prompt, its choice's tokens."""
        prompt_tokens = len(self.prompts[choice.prompt_index].token_ids)
        completion_tokens = len(choice.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def metrics(self) -> dict[str, Any] | None:
        """vLLM's per-request `metrics`: with --enable-per-request-metrics, for a single sequence (one prompt,
        n=1)."""
        return reply_metrics(self.args.enable_per_request_metrics, len(self.choices), self.timings,
                             self.num_output_tokens)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name}

    async def chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]], log: RequestLog
                     ) -> AsyncIterator[dict[str, Any]]:
        """The streamed reply: a chunk per delta (each choice's first led by the echoed prompt), then the usage
        chunk when asked. Closes `outputs` however it ends."""
        sends = stream_usage(self.request.stream_options, force=self.args.enable_force_include_usage)
        try:
            async for prompt_index, res in outputs:
                for index, text, ids, positions in self.update(prompt_index, res):
                    choice = self.choices[index]
                    output_ids, prompt_ids = ids, None
                    if not choice.started:
                        choice.started = True
                        echo_text, echo_ids, echo_logprobs = self.echo_prefix(choice)
                        text, ids, positions = echo_text + text, echo_ids + ids, echo_logprobs + positions
                        prompt_ids = self.prompts[prompt_index].token_ids if self.token_ids_wanted else None
                    if not text and not ids and choice.finish_reason is None:
                        continue
                    done = choice.finish_reason is not None
                    chunk = {**self.head(), "choices": [{
                        "index": index, "text": text, "logprobs": self.logprobs_json(choice, ids, positions),
                        "finish_reason": choice.finish_reason if done else None,
                        "stop_reason": choice.stop_reason if done else None,
                        "prompt_token_ids": prompt_ids,
                        "token_ids": output_ids if self.token_ids_wanted else None,
                    }]}
                    if sends.continuous:
                        chunk["usage"] = self.choice_usage(choice)
                    yield chunk
                log.output_tokens = self.num_output_tokens
            if sends.final:
                yield final_usage_chunk(self.head(), self.usage(), self.metrics())
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def response(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            echo_text, echo_ids, echo_logprobs = self.echo_prefix(choice)
            logprobs = self.logprobs_json(choice, echo_ids + choice.token_ids, echo_logprobs + choice.logprobs)
            prompt = self.prompts[choice.prompt_index]
            choices.append({
                "index": index, "text": echo_text + choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
                "token_ids": choice.token_ids if self.token_ids_wanted else None,
                "prompt_logprobs": prompt_logprobs_json(self.prompt_logprobs[choice.prompt_index]),
                "prompt_token_ids": prompt.token_ids if self.token_ids_wanted else None,
            })
        return {**self.head(), "choices": choices, "service_tier": None, "system_fingerprint": None,
                "usage": self.usage(), "metrics": self.metrics()}


async def create_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    info = ctx.engine.info
    request = parse(CompletionRequest, body)
    check_model(info.served_model_names, request.model)
    reject_unsupported(request)
    if request.suffix is not None:
        raise APIError("suffix is not currently supported.", param="suffix")
    limit = input_char_limit(ctx.render_pool.max_chars_per_token, info.max_model_len, request.max_tokens,
                             request.truncate_prompt_tokens)
    prompts = [truncate_prompt(prompt, request, info.tokenizer, info.max_model_len) for prompt in
               await completion_prompts(ctx.render_pool, request.prompt, add_special_tokens=request.add_special_tokens,
                                        limit=limit)]
    check_prompt_tokens(sum(len(prompt.token_ids) for prompt in prompts), ctx.args.max_prompt_tokens_per_request)
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo and request.logprobs is not None:
        prompt_logprobs = request.logprobs
    structured, structured_param = requested_structured_outputs(request)
    if request.use_beam_search:
        check_completion_beam_search(request, constraint_param=structured_param if structured is not None else None)
    if structured is not None:
        await check_compiles(info, structured, structured_param)
    logprobs = None if request.logprob_token_ids else request.logprobs
    params = build_sampling_params(request, max_tokens=request.max_tokens, logprobs=logprobs,
                                   prompt_logprobs=prompt_logprobs, model_defaults=info.default_sampling,
                                   vocab_size=info.vocab_size, structured_outputs=structured)
    error_params = {"structured_outputs": structured_param}
    if request.prompt_logprobs is None and prompt_logprobs is not None:
        error_params["prompt_logprobs"] = "logprobs"  # echo's prompt logprobs are the request's `logprobs`
    reply = _Reply(request, prompts, f"cmpl-{base_request_id(raw, request.request_id)}", ctx.model_name,
                   info.tokenizer, ctx.args)
    log = RequestLog(ctx.args.enable_log_requests, reply.id, sum(len(p.token_ids) for p in prompts))
    request_ids = [f"{reply.id}-{i}" for i in range(len(prompts))]
    if request.use_beam_search:
        outputs = start_beam_search(ctx.engine, prompts, request, request_ids, max_tokens=request.max_tokens,
                                    error_params=error_params)
    else:
        outputs = start_generation(ctx.engine, prompts, [params] * len(prompts), request_ids,
                                   cache_salt=request.cache_salt,
                                   default_max_tokens=info.default_sampling.get("max_tokens"),
                                   error_params=error_params)
    if request.stream:
        return SSEResponse(to_sse(reply.chunks(outputs, log), log, ctx.engine, error_params))
    for prompt_index, res in await collect(outputs, log, ctx.engine, error_params):
        reply.update(prompt_index, res)
    log.output_tokens = reply.num_output_tokens
    log.done("finished")
    return JSONResponse(reply.response())
