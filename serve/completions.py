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
)
from serve.logprobs import TokenNamer, completion_logprobs
from serve.protocol import CompletionRequest
from serve.streaming import RequestLog, SSEResponse, collect, start_generation, to_sse, usage

if TYPE_CHECKING:
    from serve.app import ServingContext


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
                 tokenizer: Any) -> None:
        self.request, self.prompts, self.id, self.model_name = request, prompts, rid, model_name
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.n = 1 if request.n is None else request.n
        self.choices = [_Choice(i // self.n) for i in range(len(prompts) * self.n)]
        self.cached_tokens = [0] * len(prompts)
        self.prompt_logprobs: list[list[dict[int, Logprob] | None] | None] = [None] * len(prompts)
        self.name = TokenNamer(tokenizer, bool(request.return_tokens_as_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def update(self, prompt_index: int, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        """Fold one delta output in; returns (choice index, delta text, delta ids, delta logprobs) per sample."""
        self.cached_tokens[prompt_index] = res.num_cached_tokens
        if res.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = res.prompt_logprobs
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
        """Prompt text, ids and logprobs shown before the output when `echo` is on."""
        if not self.request.echo:
            return "", [], []
        prompt = self.prompts[choice.prompt_index]
        text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
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
        return usage(prompt_tokens, self.num_output_tokens, sum(self.cached_tokens))

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model_name, "choices": choices}
        if with_usage:
            body["usage"] = self.usage()
        return body

    async def chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]], log: RequestLog
                     ) -> AsyncIterator[dict[str, Any]]:
        """The streamed reply: a chunk per delta (each choice's first led by the echoed prompt), then the usage
        chunk when asked. Closes `outputs` however it ends."""
        options = self.request.stream_options
        continuous = bool(options and options.include_usage and options.continuous_usage_stats)
        try:
            async for prompt_index, res in outputs:
                for index, text, ids, positions in self.update(prompt_index, res):
                    choice = self.choices[index]
                    if not choice.started:
                        choice.started = True
                        echo_text, echo_ids, echo_logprobs = self.echo_prefix(choice)
                        text, ids, positions = echo_text + text, echo_ids + ids, echo_logprobs + positions
                    if not text and not ids and choice.finish_reason is None:
                        continue
                    done = choice.finish_reason is not None
                    yield self.chunk([{
                        "index": index, "text": text, "logprobs": self.logprobs_json(choice, ids, positions),
                        "finish_reason": choice.finish_reason if done else None,
                        "stop_reason": choice.stop_reason if done else None,
                    }], with_usage=continuous)
                log.output_tokens = self.num_output_tokens
            if options and options.include_usage:
                yield self.chunk([], with_usage=True)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def response(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            echo_text, echo_ids, echo_logprobs = self.echo_prefix(choice)
            logprobs = self.logprobs_json(choice, echo_ids + choice.token_ids, echo_logprobs + choice.logprobs)
            choices.append({"index": index, "text": echo_text + choice.text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        body = self.chunk(choices)
        body.update(system_fingerprint=None, service_tier=None, usage=self.usage())
        return body


async def create_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    info = ctx.engine.info
    request = parse(CompletionRequest, body)
    check_model(info.served_model_names, request.model)
    reject_unsupported(request)
    if request.suffix is not None:
        raise APIError("suffix is not currently supported.", param="suffix")
    prompts = completion_prompts(info.tokenizer, request.prompt, add_special_tokens=request.add_special_tokens)
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo and request.logprobs is not None:
        prompt_logprobs = request.logprobs
    structured, structured_param = requested_structured_outputs(request)
    if structured is not None:
        await check_compiles(info, structured, structured_param)
    params = build_sampling_params(request, max_tokens=request.max_tokens, logprobs=request.logprobs,
                                   prompt_logprobs=prompt_logprobs, model_defaults=info.default_sampling,
                                   vocab_size=info.vocab_size, structured_outputs=structured)
    error_params = {"structured_outputs": structured_param}
    if request.prompt_logprobs is None and prompt_logprobs is not None:
        error_params["prompt_logprobs"] = "logprobs"  # echo's prompt logprobs are the request's `logprobs`
    reply = _Reply(request, prompts, f"cmpl-{base_request_id(raw, request.request_id)}", ctx.model_name,
                   info.tokenizer)
    log = RequestLog(ctx.args.enable_log_requests, reply.id, sum(len(p.token_ids) for p in prompts))
    outputs = start_generation(ctx.engine, prompts, [params] * len(prompts),
                               [f"{reply.id}-{i}" for i in range(len(prompts))], cache_salt=request.cache_salt,
                               default_max_tokens=info.default_sampling.get("max_tokens"), error_params=error_params)
    if request.stream:
        return SSEResponse(to_sse(reply.chunks(outputs, log), log, ctx.engine, error_params))
    for prompt_index, res in await collect(outputs, log, ctx.engine, error_params):
        reply.update(prompt_index, res)
    log.output_tokens = reply.num_output_tokens
    log.done("finished")
    return JSONResponse(reply.response())
