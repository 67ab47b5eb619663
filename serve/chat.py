"""POST /v1/chat/completions, shaped as vLLM's (`chatcmpl-…`, `chat.completion(.chunk)`, role first).

    request -> prompt + sampling params (serve.inputs; tools: serve.tool_choice) -> generation
            -> chunks (streamed) or the whole reply (serve.streaming) -> response

`tool_choice` and `response_format` / `structured_outputs` decide the decoding constraint; the output text
goes through `serve.output_parsing` (reasoning split off, then tool calls read out) into the message, or
into each streamed delta.
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
    chat_prompt,
    check_compiles,
    check_model,
    parse,
    reject_unsupported,
    requested_structured_outputs,
)
from serve.logprobs import TokenNamer, chat_logprobs
from serve.output_parsing import ChoiceParser, OutputParsers, ParsedOutput, ReasoningParser
from serve.protocol import ChatCompletionRequest
from serve.reasoning_parsers import get_reasoning_parser
from serve.streaming import RequestLog, SSEResponse, collect, start_generation, to_sse, usage
from serve.tool_choice import NO_TOOLS, ToolHandling, resolve_tools

if TYPE_CHECKING:
    from serve.app import ServingContext


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stream: ChoiceParser | None = None  # the parsers' state, when streaming through them
    # Streaming: tokens whose text the parsers still hold back; their logprobs go with the next chunk.
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)


class _Reply:
    """The chat reply being built: its choices as the engine's outputs accumulate, its chunks and body."""

    def __init__(self, request: ChatCompletionRequest, prompt: EnginePrompt, rid: str, model_name: str,
                 tokenizer: Any, tools: ToolHandling, parsers: OutputParsers | None) -> None:
        """`parsers`: what reads reasoning and tool calls out of the text (None: it is all content)."""
        self.request, self.prompt, self.id, self.model_name = request, prompt, rid, model_name
        self.tools, self.parsers = tools, parsers
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(1 if request.n is None else request.n)]
        if request.stream and parsers is not None:
            for choice in self.choices:
                choice.stream = parsers.stream()
        self.cached_tokens = 0
        last = request.messages[-1]
        # vLLM: the reply's role is the assistant's, or the last message's when no generation prompt is added.
        self.role = "assistant" if request.add_generation_prompt else last["role"]
        content = last.get("content")
        self.echo = (content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict))
        ) if request.echo and last["role"] == self.role else ""
        self.num_top = (request.top_logprobs or 0) if request.logprobs else None
        self.name = None if self.num_top is None else TokenNamer(tokenizer, bool(request.return_tokens_as_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def update(self, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        self.cached_tokens = res.num_cached_tokens
        deltas = []
        for out in res.outputs:
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

    def logprobs_json(self, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        if self.num_top is None or self.name is None:
            return None
        return chat_logprobs(ids, positions, self.num_top, self.name)

    def usage(self) -> dict[str, Any]:
        return usage(len(self.prompt.token_ids), self.num_output_tokens, self.cached_tokens)

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model_name, "choices": choices}
        if with_usage:
            body["usage"] = self.usage()
        return body

    async def chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]], log: RequestLog
                     ) -> AsyncIterator[dict[str, Any]]:
        """The streamed reply: once the engine's first output is in, the role for every choice, as vLLM (and
        OpenAI) do, then the echoed prefix, if any; a chunk per delta; the usage chunk when asked. Closes
        `outputs` however it ends.

        NOTE: the role waits for the first output, as vLLM's does: benchmark clients time the first token at
        the first chunk, and an error before it comes as the stream's first event."""
        options = self.request.stream_options
        continuous = bool(options and options.include_usage and options.continuous_usage_stats)
        try:
            first = True
            async for _, res in outputs:
                if first:
                    first = False
                    for index in range(len(self.choices)):
                        yield self.chunk([{"index": index, "delta": {"role": self.role, "content": ""},
                                           "logprobs": None, "finish_reason": None}], continuous)
                        if self.echo:
                            yield self.chunk([{"index": index, "delta": {"content": self.echo}, "logprobs": None,
                                               "finish_reason": None}], continuous)
                for index, text, ids, positions in self.update(res):
                    if (body := self._choice_chunk(index, text, ids, positions)) is not None:
                        yield self.chunk([body], continuous)
                log.output_tokens = self.num_output_tokens
            if options and options.include_usage:
                yield self.chunk([], with_usage=True)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def _choice_chunk(self, index: int, text: str, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        choice = self.choices[index]
        done = choice.finish_reason is not None
        if not text and not ids and not done:
            return None
        delta = self.delta(choice, text)
        choice.pending_ids += ids
        choice.pending_logprobs += positions
        if delta is None and not done:
            return None
        ids, positions = choice.pending_ids, choice.pending_logprobs
        choice.pending_ids, choice.pending_logprobs = [], []
        tools_called = choice.stream is not None and choice.stream.tools_called
        body: dict[str, Any] = {"index": index, "delta": delta or {"content": ""},
                                "logprobs": self.logprobs_json(ids, positions),
                                "finish_reason": self.tools.finish_reason(tools_called, choice.finish_reason)
                                if done else None}
        if done:
            body["stop_reason"] = choice.stop_reason
        return body

    def response(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            parsed = self.parsers.parse(choice.text) if self.parsers is not None else ParsedOutput(None, choice.text)
            choices.append({
                "index": index,
                "message": self._message(parsed),
                "logprobs": self.logprobs_json(choice.token_ids, choice.logprobs),
                "finish_reason": self.tools.finish_reason(bool(parsed.tool_calls), choice.finish_reason),
                "stop_reason": choice.stop_reason,
            })
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": choices, "service_tier": None, "system_fingerprint": None, "usage": self.usage(),
                "prompt_logprobs": None}

    def _message(self, parsed: ParsedOutput) -> dict[str, Any]:
        content = parsed.content
        if self.tools.choice in ("required", "named"):
            content = content or ""  # vLLM's, for a forced call
        if self.echo:
            content = self.echo + (content or "")
        reasoning = parsed.reasoning if self.request.include_reasoning else None
        return {"role": self.role, "content": content, "refusal": None, "annotations": None, "audio": None,
                "function_call": None, "tool_calls": parsed.tool_calls, "reasoning": reasoning,
                "reasoning_content": reasoning}


async def create_chat_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    info = ctx.engine.info
    request = parse(ChatCompletionRequest, body)
    check_model(info.served_model_names, request.model)
    reject_unsupported(request)
    wants_tools = request.tools is not None or request.tool_choice is not None
    tools = resolve_tools(request, ctx.args) if wants_tools else NO_TOOLS
    if request.chat_template is not None:
        # vLLM refuses per-request templates unless --trust-request-chat-template; jaxllm has no such flag.
        raise APIError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                       "Refused request with untrusted chat template.", param="chat_template")
    template_kwargs = dict(request.chat_template_kwargs or {})
    if request.documents is not None:
        template_kwargs.setdefault("documents", request.documents)
    prompt = chat_prompt(
        info.tokenizer, request.messages, chat_template=info.chat_template,
        add_generation_prompt=request.add_generation_prompt, continue_final_message=request.continue_final_message,
        add_special_tokens=request.add_special_tokens, tools=tools.tools, chat_template_kwargs=template_kwargs,
    )
    structured, structured_param = requested_structured_outputs(request, tools.constraint)
    if structured is not None:
        await check_compiles(info, structured, structured_param)
    params = build_sampling_params(
        request,
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        prompt_logprobs=request.prompt_logprobs,
        model_defaults=info.default_sampling,
        vocab_size=info.vocab_size,
        structured_outputs=structured,
        keep_special_tokens=tools.keep_special_tokens,
    )
    # The engine's names for the fields it checks, as this request spells them.
    error_params = {"logprobs": "top_logprobs", "structured_outputs": structured_param}
    if request.max_completion_tokens is not None:
        error_params["max_tokens"] = "max_completion_tokens"
    reasoning = _reasoning_parser(ctx, request, constrained=structured is not None)
    parsers = OutputParsers(reasoning, tools.parser, request) if reasoning or tools.parser else None
    reply = _Reply(request, prompt, f"chatcmpl-{base_request_id(raw, request.request_id)}", ctx.model_name,
                   info.tokenizer, tools, parsers)
    log = RequestLog(ctx.args.enable_log_requests, reply.id, len(prompt.token_ids))
    outputs = start_generation(ctx.engine, [prompt], [params], [reply.id], cache_salt=request.cache_salt,
                               default_max_tokens=info.default_sampling.get("max_tokens"), error_params=error_params)
    if request.stream:
        return SSEResponse(to_sse(reply.chunks(outputs, log), log, ctx.engine, error_params))
    for _, res in await collect(outputs, log, ctx.engine, error_params):
        reply.update(res)
    log.output_tokens = reply.num_output_tokens
    log.done("finished")
    return JSONResponse(reply.response())


def _reasoning_parser(ctx: ServingContext, request: ChatCompletionRequest, constrained: bool) -> ReasoningParser | None:
    if ctx.args.reasoning_parser is None or constrained:
        # NOTE: the grammar holds from the first token (the engine has no "after </think>" start, as vLLM's
        # reasoning-aware structured outputs), so a constrained output holds no reasoning: it is all content.
        return None
    return get_reasoning_parser(ctx.args.reasoning_parser, request.chat_template_kwargs)


def _merge(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two consecutive deltas as one (text fields concatenated, tool-call entries in order)."""
    if not first or not second:
        return first or second
    out = dict(first)
    for key, value in second.items():
        out[key] = out[key] + value if key in out else value
    return out
