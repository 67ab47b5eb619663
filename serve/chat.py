"""POST /v1/chat/completions, shaped as vLLM's (`chatcmpl-…`, `chat.completion(.chunk)`, role first).

    request -> prompt + sampling params (serve.inputs; tools: serve.tool_choice) -> generation
            -> chunks (streamed) or the whole reply (serve.streaming) -> response

`tool_choice` and `response_format` / `structured_outputs` decide the decoding constraint; the output text
goes through `serve.output_parsing` (reasoning split off, then tool calls read out) into the message, or
into each streamed delta; for gpt-oss (its model type, or a harmony parser flag), the output's token ids go
through `serve.harmony_chat` instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.outputs import Logprob, RequestOutput
from serve.beam_search import check_beam_search, start_beam_search
from serve.errors import APIError
from serve.harmony import GptOssReasoningParser
from serve.harmony_chat import (
    GPT_OSS,
    HarmonyChoiceParser,
    HarmonyOutputParsers,
    assistant_action_stops,
    check_reasoning_effort,
    harmony_output_parsers,
    uses_harmony,
)
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
    truncate_prompt,
)
from serve.logprobs import TokenNamer, chat_logprobs, prompt_logprobs_json, top_count
from serve.output_parsing import ChoiceParser, OutputParsers, ParsedOutput, ReasoningParser
from serve.prompt_length import input_char_limit
from serve.protocol import ChatCompletionRequest
from serve.reasoning_parsers import get_reasoning_parser
from serve.request_metrics import reply_metrics
from serve.streaming import RequestLog, SSEResponse, collect, start_generation, to_sse
from serve.tool_choice import NO_TOOLS, ToolHandling, resolve_tools
from serve.usage import final_usage_chunk, stream_usage, usage

if TYPE_CHECKING:
    from serve.app import ServingContext
    from serve.args import ServerArgs


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stream: ChoiceParser | HarmonyChoiceParser | None = None  # the parsers' state, when streaming through them
    # Streaming: tokens whose text the parsers still hold back; their logprobs go with the next chunk.
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)


class _Reply:
    """The chat reply being built: its choices as the engine's outputs accumulate, its chunks and body."""

    def __init__(self, request: ChatCompletionRequest, prompt: EnginePrompt, rid: str, model_name: str,
                 tokenizer: Any, tools: ToolHandling, parsers: OutputParsers | HarmonyOutputParsers | None,
                 args: ServerArgs) -> None:
        """`parsers`: what reads reasoning and tool calls out of the output (None: it is all content)."""
        self.request, self.prompt, self.id, self.model_name = request, prompt, rid, model_name
        self.tools, self.parsers, self.args, self.tokenizer = tools, parsers, args, tokenizer
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(1 if request.n is None else request.n)]
        if request.stream and parsers is not None:
            for choice in self.choices:
                choice.stream = parsers.stream()
        self.cached_tokens = 0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.timings: dict[str, float] = {}
        last = request.messages[-1]
        # vLLM: the reply's role is the assistant's, or the last message's when no generation prompt is added.
        self.role = "assistant" if request.add_generation_prompt else last["role"]
        content = last.get("content")
        self.echo = (content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict))
        ) if request.echo and last["role"] == self.role else ""
        self.num_top = top_count(request.top_logprobs, token_ids_listed=bool(request.logprob_token_ids))
        self.name = TokenNamer.of(tokenizer, request.return_tokens_as_token_ids, args.return_tokens_as_token_ids
                                  ) if request.logprobs else None
        self.token_ids_wanted = bool(request.return_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def update(self, res: RequestOutput) -> list[tuple[int, str, list[int], list[Any]]]:
        self.cached_tokens = res.num_cached_tokens
        if res.prompt_logprobs is not None:
            self.prompt_logprobs = res.prompt_logprobs
        self.timings = res.metrics or self.timings
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

    def delta(self, choice: _Choice, text: str, ids: list[int]) -> dict[str, Any] | None:
        """The chunk's delta for new output text and tokens; None while the parsers hold all of it back."""
        if choice.stream is None:
            return {"content": text}
        delta = choice.stream.feed(text, ids)
        if choice.finish_reason is not None:
            delta = _merge(delta, choice.stream.finish())
        if delta is not None and not self.request.include_reasoning:
            delta = {k: v for k, v in delta.items() if k not in ("reasoning", "reasoning_content")} or None
        return delta

    def logprobs_json(self, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        if self.name is None:
            return None
        return chat_logprobs(ids, positions, self.num_top, self.name)

    def reasoning_tokens(self, choices: list[_Choice]) -> int | None:
        """None without --reasoning-parser (vLLM's null `completion_tokens_details`); 0 for a request the
        parser does not read (a constrained one)."""
        if self.args.reasoning_parser is None:
            return None
        reasoning = self.parsers.reasoning if self.parsers is not None else None
        if reasoning is None:
            return 0
        return sum(reasoning.count_reasoning_tokens(c.token_ids, self.tokenizer) for c in choices if c.token_ids)

    def usage(self, choices: list[_Choice] | None = None, *, with_details: bool = True) -> dict[str, Any]:
        """The usage of `choices` (all of them: the request's); `with_details`: prompt_tokens_details, where
        the flag allows it."""
        choices = self.choices if choices is None else choices
        details = with_details and self.args.enable_prompt_tokens_details
        return usage(len(self.prompt.token_ids), sum(len(c.token_ids) for c in choices),
                     cached_tokens=self.cached_tokens if details else None,
                     reasoning_tokens=self.reasoning_tokens(choices))

    def metrics(self) -> dict[str, Any] | None:
        """vLLM's per-request `metrics`: with --enable-per-request-metrics, for a single sequence (n=1)."""
        return reply_metrics(self.args.enable_per_request_metrics, len(self.choices), self.timings,
                             self.num_output_tokens)

    def chunk(self, choices: list[dict[str, Any]], usage_stats: dict[str, Any] | None = None,
              **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model_name, "choices": choices, **fields}
        if usage_stats is not None:
            body["usage"] = usage_stats
        return body

    async def chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]], log: RequestLog
                     ) -> AsyncIterator[dict[str, Any]]:
        """The streamed reply: once the engine's first output is in, the role for every choice, as vLLM (and
        OpenAI) do, then the echoed prefix, if any; a chunk per delta; the usage chunk when asked. Closes
        `outputs` however it ends.

        NOTE: the role waits for the first output, as vLLM's does: benchmark clients time the first token at
        the first chunk, and an error before it comes as the stream's first event."""
        sends = stream_usage(self.request.stream_options, force=self.args.enable_force_include_usage)
        try:
            first = True
            async for _, res in outputs:
                if first:
                    first = False
                    prompt_ids = self.prompt.token_ids if self.token_ids_wanted else None
                    for index in range(len(self.choices)):
                        yield self.chunk([{"index": index, "delta": {"role": self.role, "content": ""},
                                           "logprobs": None, "finish_reason": None}],
                                         self.usage([]) if sends.continuous else None, prompt_token_ids=prompt_ids)
                        if self.echo:
                            yield self.chunk([{"index": index, "delta": {"content": self.echo}, "logprobs": None,
                                               "finish_reason": None}],
                                             self.usage([], with_details=False) if sends.continuous else None)
                for index, text, ids, positions in self.update(res):
                    if (body := self._choice_chunk(index, text, ids, positions)) is not None:
                        running = self.usage([self.choices[index]], with_details=False) if sends.continuous else None
                        yield self.chunk([body], running)
                log.output_tokens = self.num_output_tokens
            if sends.final:
                head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model_name}
                yield final_usage_chunk(head, self.usage(), self.metrics())
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def _choice_chunk(self, index: int, text: str, ids: list[int], positions: list[Any]) -> dict[str, Any] | None:
        choice = self.choices[index]
        done = choice.finish_reason is not None
        if not text and not ids and not done:
            return None
        delta = self.delta(choice, text, ids)
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
        body["token_ids"] = ids if self.token_ids_wanted else None
        return body

    def response(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            parsed = (self.parsers.parse(choice.text, choice.token_ids) if self.parsers is not None
                      else ParsedOutput(None, choice.text))
            choices.append({
                "index": index,
                "message": self._message(parsed),
                "logprobs": self.logprobs_json(choice.token_ids, choice.logprobs),
                "finish_reason": self.tools.finish_reason(bool(parsed.tool_calls), choice.finish_reason),
                "stop_reason": choice.stop_reason,
                "token_ids": choice.token_ids if self.token_ids_wanted else None,
            })
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": choices, "service_tier": None, "system_fingerprint": None, "usage": self.usage(),
                "prompt_logprobs": prompt_logprobs_json(self.prompt_logprobs),
                "prompt_token_ids": self.prompt.token_ids if self.token_ids_wanted else None,
                "metrics": self.metrics()}

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
    tools = resolve_tools(request, ctx.args, harmony_model=info.model_type == GPT_OSS) if wants_tools else NO_TOOLS
    if request.chat_template is not None:
        # vLLM refuses per-request templates unless --trust-request-chat-template; jaxllm has no such flag.
        raise APIError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                       "Refused request with untrusted chat template.", param="chat_template")
    harmony = uses_harmony(ctx.args.reasoning_parser, ctx.args.tool_call_parser, info.model_type)
    if harmony:
        check_reasoning_effort(request.reasoning_effort)
    template_kwargs = dict(request.chat_template_kwargs or {})
    if request.documents is not None:
        template_kwargs.setdefault("documents", request.documents)
    if request.reasoning_effort is not None:  # vLLM's: the field wins over a kwarg, and sets enable_thinking
        template_kwargs["reasoning_effort"] = request.reasoning_effort
        template_kwargs.setdefault("enable_thinking", request.reasoning_effort != "none")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    prompt = await chat_prompt(
        ctx.render_pool, request.messages, chat_template=info.chat_template,
        limit=input_char_limit(ctx.render_pool.max_chars_per_token, info.max_model_len, max_tokens,
                               request.truncate_prompt_tokens),
        add_generation_prompt=request.add_generation_prompt, continue_final_message=request.continue_final_message,
        add_special_tokens=request.add_special_tokens, tools=tools.tools, chat_template_kwargs=template_kwargs,
    )
    prompt = truncate_prompt(prompt, request, info.tokenizer, info.max_model_len)
    structured, structured_param = requested_structured_outputs(request, tools.constraint)
    if request.use_beam_search:
        check_beam_search(request, constraint_param=structured_param if structured is not None else None)
    if structured is not None:
        await check_compiles(info, structured, structured_param)
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = request.top_logprobs  # vLLM's: echo shows the prompt's logprobs at top_logprobs
    params = build_sampling_params(
        request,
        max_tokens=max_tokens,
        logprobs=(request.top_logprobs or 0) if request.logprobs and not request.logprob_token_ids else None,
        prompt_logprobs=prompt_logprobs,
        model_defaults=info.default_sampling,
        vocab_size=info.vocab_size,
        structured_outputs=structured,
        keep_special_tokens=tools.keep_special_tokens,
    )
    if harmony_stops := assistant_action_stops(info.model_type, info.tokenizer):  # after the request's own, as vLLM
        params = params.clone(stop_token_ids=list(dict.fromkeys([*params.stop_token_ids, *harmony_stops])))
    # The engine's names for the fields it checks, as this request spells them.
    error_params = {"logprobs": "top_logprobs", "structured_outputs": structured_param}
    if request.max_completion_tokens is not None:
        error_params["max_tokens"] = "max_completion_tokens"
    if request.prompt_logprobs is None and prompt_logprobs is not None:
        error_params["prompt_logprobs"] = "top_logprobs"
    reasoning = _reasoning_parser(ctx, template_kwargs, constrained=structured is not None)
    parsers: OutputParsers | HarmonyOutputParsers | None
    if harmony and structured is None:
        parsers = harmony_output_parsers(reasoning, tools.parser, request, info.tokenizer)
    else:
        parsers = OutputParsers(reasoning, tools.parser, request) if reasoning or tools.parser else None
    reply = _Reply(request, prompt, f"chatcmpl-{base_request_id(raw, request.request_id)}", ctx.model_name,
                   info.tokenizer, tools, parsers, ctx.args)
    log = RequestLog(ctx.args.enable_log_requests, reply.id, len(prompt.token_ids))
    if request.use_beam_search:
        outputs = start_beam_search(ctx.engine, [prompt], request, [reply.id], max_tokens=params.max_tokens,
                                    error_params=error_params)
    else:
        outputs = start_generation(ctx.engine, [prompt], [params], [reply.id], cache_salt=request.cache_salt,
                                   default_max_tokens=info.default_sampling.get("max_tokens"),
                                   error_params=error_params)
    if request.stream:
        return SSEResponse(to_sse(reply.chunks(outputs, log), log, ctx.engine, error_params))
    for _, res in await collect(outputs, log, ctx.engine, error_params):
        reply.update(res)
    log.output_tokens = reply.num_output_tokens
    log.done("finished")
    return JSONResponse(reply.response())


def _reasoning_parser(ctx: ServingContext, template_kwargs: dict[str, Any], constrained: bool
                      ) -> ReasoningParser | GptOssReasoningParser | None:
    """`template_kwargs`: what the chat template was given (`enable_thinking` may come from reasoning_effort)."""
    if ctx.args.reasoning_parser is None or constrained:
        # NOTE: the grammar holds from the first token (the engine has no "after </think>" start, as vLLM's
        # reasoning-aware structured outputs), so a constrained output holds no reasoning: it is all content.
        return None
    return get_reasoning_parser(ctx.args.reasoning_parser, template_kwargs)


def _merge(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two consecutive deltas as one (text fields concatenated, tool-call entries in order)."""
    if not first or not second:
        return first or second
    out = dict(first)
    for key, value in second.items():
        out[key] = out[key] + value if key in out else value
    return out
