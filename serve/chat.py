"""POST /v1/chat/completions, shaped as vLLM's (`chatcmpl-…`, `chat.completion(.chunk)`, role first).

`tool_choice` (`serve.tool_choice`) and `response_format` / `structured_outputs` (`serve.structured`) decide
the decoding constraint; the output text goes through `serve.output_parsing` (reasoning split off, then
tool calls read out) into the message, or into each streamed delta.
"""

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
from serve.logprobs import TokenNamer, chat_logprobs
from serve.output_parsing import OutputParsers, OutputStream, ParsedOutput, ReasoningParser
from serve.prompts import EnginePrompt, chat_prompt, resolve_max_tokens
from serve.protocol import ChatCompletionRequest
from serve.reasoning_parsers import get_reasoning_parser
from serve.sampling import build_sampling_params, reject_unsupported
from serve.streaming import SSEResponse, sse
from serve.structured import check_compiles, requested_structured_outputs
from serve.tool_choice import ToolHandling, resolve_tools


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stream: OutputStream | None = None  # the parsers' state, when streaming through them
    # Streaming: tokens whose text the parsers still hold back; their logprobs go with the next chunk.
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)


class _Chat:
    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest, prompt: EnginePrompt, rid: str,
                 tools: ToolHandling, parsers: OutputParsers) -> None:
        self.ctx, self.request, self.prompt, self.id = ctx, request, prompt, rid
        self.tools, self.parsers = tools, parsers
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(1 if request.n is None else request.n)]
        if request.stream and parsers.active:
            for choice in self.choices:
                choice.stream = parsers.stream()
        self.cached_tokens = 0
        self.name = TokenNamer(ctx.engine.tokenizer, bool(request.return_tokens_as_token_ids))
        last = request.messages[-1]
        # vLLM: the reply's role is the assistant's, or the last message's when no generation prompt is added.
        self.role = "assistant" if request.add_generation_prompt else last["role"]
        content = last.get("content")
        self.echo = (content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict))
        ) if request.echo and last["role"] == self.role else ""
        self.num_top = (request.top_logprobs or 0) if request.logprobs else None
        self.start = time.perf_counter()

    def update(self, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        self.cached_tokens = res.num_cached_tokens
        deltas = []
        for out in res.outputs:
            if out.finish_reason == "error":
                raise APIError("The engine failed while generating this request.", HTTPStatus.INTERNAL_SERVER_ERROR)
            choice = self.choices[out.index]
            positions = list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)
            choice.text += out.text
            choice.token_ids += out.token_ids
            choice.logprobs += positions
            if out.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
            deltas.append((out.index, out.text, list(out.token_ids), positions))
        return deltas

    def delta(self, choice: _Choice, text: str) -> dict[str, Any] | None:
        """The chunk's delta for new output text; None while the parsers hold all of it back."""
        if choice.stream is None:
            return {"content": text}
        delta = choice.stream.feed(text)
        if choice.finish_reason is not None:
            delta = _merge(delta, choice.stream.finish())
        if delta is not None and not self.request.include_reasoning:
            delta = {k: v for k, v in delta.items() if k not in ("reasoning", "reasoning_content")} or None
        return delta

    def finish_reason(self, choice: _Choice, tools_called: bool) -> str | None:
        return self.tools.finish_reason(tools_called, choice.finish_reason)

    def logprobs_json(self, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        return None if self.num_top is None else chat_logprobs(ids, positions, self.num_top, self.name)

    def usage(self) -> dict[str, Any]:
        return usage(len(self.prompt.token_ids), sum(len(c.token_ids) for c in self.choices), self.cached_tokens)

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.ctx.model_name, "choices": choices}
        if with_usage:
            body["usage"] = self.usage()
        return body

    def log(self, status: str) -> None:
        self.ctx.log_request(self.id, len(self.prompt.token_ids), sum(len(c.token_ids) for c in self.choices),
                             self.start, status)


async def create_chat_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    request = parse(ChatCompletionRequest, body)
    check_model(ctx, request.model)
    reject_unsupported(request)
    tools = resolve_tools(request, ctx.args)
    if request.chat_template is not None:
        # vLLM refuses per-request templates unless --trust-request-chat-template; jaxllm has no such flag.
        raise APIError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                       "Refused request with untrusted chat template.", param="chat_template")
    engine = ctx.engine
    template_kwargs = dict(request.chat_template_kwargs or {})
    if request.documents is not None:
        template_kwargs.setdefault("documents", request.documents)
    prompt = chat_prompt(
        engine.tokenizer, request.messages, chat_template=ctx.chat_template,
        add_generation_prompt=request.add_generation_prompt, continue_final_message=request.continue_final_message,
        add_special_tokens=request.add_special_tokens, tools=tools.tools, chat_template_kwargs=template_kwargs,
    )
    structured, structured_param = requested_structured_outputs(request, tools.constraint)
    if structured is not None:
        await check_compiles(engine, structured, structured_param)
    requested, param = request.max_completion_tokens, "max_completion_tokens"
    if requested is None:
        requested, param = request.max_tokens, "max_tokens"
    params = build_sampling_params(
        request,
        max_tokens=resolve_max_tokens(engine.max_model_len, len(prompt.token_ids), requested, param,
                                      ctx.default_sampling.get("max_tokens")),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        prompt_logprobs=request.prompt_logprobs,
        model_defaults=ctx.default_sampling,
        vocab_size=engine.vocab_size,
        structured_outputs=structured,
        keep_special_tokens=tools.keep_special_tokens,
        logprobs_param="top_logprobs",
    )
    parsers = OutputParsers(_reasoning_parser(ctx, request, constrained=structured is not None), tools.parser,
                            request)
    state = _Chat(ctx, request, prompt, f"chatcmpl-{base_request_id(raw, request.request_id)}", tools, parsers)
    outputs = await start_generation(ctx, [prompt], [params], [state.id], request.cache_salt)
    if request.stream:
        return SSEResponse(finish_sse(state, outputs, _chunks(state, outputs)))
    await collect(state, outputs, lambda _, res: state.update(res))
    return JSONResponse(_final_response(state))


def _reasoning_parser(ctx: ServingContext, request: ChatCompletionRequest, constrained: bool) -> ReasoningParser | None:
    if ctx.args.reasoning_parser is None or constrained:
        # NOTE: the grammar holds from the first token (the engine has no "after </think>" start, as vLLM's
        # reasoning-aware structured outputs), so a constrained output holds no reasoning: it is all content.
        return None
    return get_reasoning_parser(ctx.args.reasoning_parser, request.chat_template_kwargs)


def _message(state: _Chat, parsed: ParsedOutput) -> dict[str, Any]:
    content = parsed.content
    if state.tools.choice in ("required", "named"):
        content = content or ""  # vLLM's, for a forced call
    if state.echo:
        content = state.echo + (content or "")
    reasoning = parsed.reasoning if state.request.include_reasoning else None
    return {"role": state.role, "content": content, "refusal": None, "annotations": None, "audio": None,
            "function_call": None, "tool_calls": parsed.tool_calls, "reasoning": reasoning,
            "reasoning_content": reasoning}


def _final_response(state: _Chat) -> dict[str, Any]:
    choices = []
    for index, choice in enumerate(state.choices):
        parsed = state.parsers.parse(choice.text)
        choices.append({
            "index": index,
            "message": _message(state, parsed),
            "logprobs": state.logprobs_json(choice.token_ids, choice.logprobs),
            "finish_reason": state.finish_reason(choice, bool(parsed.tool_calls)),
            "stop_reason": choice.stop_reason,
        })
    return {"id": state.id, "object": "chat.completion", "created": state.created, "model": state.ctx.model_name,
            "choices": choices, "service_tier": None, "system_fingerprint": None, "usage": state.usage(),
            "prompt_logprobs": None}


def _merge(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two consecutive deltas as one (text fields concatenated, tool-call entries in order)."""
    if not first or not second:
        return first or second
    out = dict(first)
    for key, value in second.items():
        out[key] = out[key] + value if key in out else value
    return out


async def _chunks(state: _Chat, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    continuous = continuous_usage(state.request)
    # The role first, for every choice, as vLLM (and OpenAI) do; then the echoed prefix, if any.
    for index in range(len(state.choices)):
        yield sse(state.chunk([{"index": index, "delta": {"role": state.role, "content": ""}, "logprobs": None,
                                "finish_reason": None}], continuous))
        if state.echo:
            yield sse(state.chunk([{"index": index, "delta": {"content": state.echo}, "logprobs": None,
                                    "finish_reason": None}], continuous))
    async for _, res in outputs:
        for index, text, ids, positions in state.update(res):
            choice = state.choices[index]
            done = choice.finish_reason is not None
            if not text and not ids and not done:
                continue
            delta = state.delta(choice, text)
            choice.pending_ids += ids
            choice.pending_logprobs += positions
            if delta is None and not done:
                continue
            ids, positions = choice.pending_ids, choice.pending_logprobs
            choice.pending_ids, choice.pending_logprobs = [], []
            tools_called = choice.stream is not None and choice.stream.tools_called
            body: dict[str, Any] = {"index": index, "delta": delta or {"content": ""},
                                    "logprobs": state.logprobs_json(ids, positions),
                                    "finish_reason": state.finish_reason(choice, tools_called) if done else None}
            if done:
                body["stop_reason"] = choice.stop_reason
            yield sse(state.chunk([body], continuous))
