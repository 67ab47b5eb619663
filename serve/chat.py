"""POST /v1/chat/completions, shaped as vLLM's (`chatcmpl-…`, `chat.completion(.chunk)`, role first)."""

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
from serve.errors import APIError, not_supported
from serve.handling import base_request_id, check_model, engine_error, parse, start_generation, usage
from serve.logprobs import TokenNamer, chat_logprobs
from serve.prompts import EnginePrompt, chat_prompt, resolve_max_tokens
from serve.protocol import ChatCompletionRequest
from serve.sampling import build_sampling_params, reject_unsupported
from serve.streaming import SSE_DONE, SSEResponse, sse


@dataclass
class ToolHandling:
    """What the chat handler does about tools (issue 6 adds parsing tool calls out of the output)."""

    tools: list[dict[str, Any]] | None  # handed to the chat template


def resolve_tools(request: ChatCompletionRequest) -> ToolHandling:
    """The seam for tool calling and structured outputs (issue 6): today tools only reach the chat
    template, `tool_choice` may be "none"/"auto" and `response_format` only text."""
    if request.tools == []:
        raise APIError("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                       "entirely.", param="tools")
    choice = request.tool_choice
    if choice is not None and choice != "none" and not request.tools:
        raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice not in (None, "none", "auto"):
        raise not_supported(f"tool_choice {choice!r} (only \"none\" and \"auto\")", "tool_choice")
    return ToolHandling(tools=request.tools)


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Chat:
    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest, prompt: EnginePrompt, rid: str) -> None:
        self.ctx, self.request, self.prompt, self.id = ctx, request, prompt, rid
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(1 if request.n is None else request.n)]
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
    tools = resolve_tools(request)
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
    )
    state = _Chat(ctx, request, prompt, f"chatcmpl-{base_request_id(raw, request.request_id)}")
    outputs = await start_generation(ctx, [prompt], [params], [state.id], request.cache_salt)
    if request.stream:
        return SSEResponse(_stream(state, outputs))
    try:
        async for _, res in outputs:
            state.update(res)
    except APIError:
        state.log("error")
        raise
    except Exception as e:
        state.log("error")
        raise engine_error(ctx, e) from e
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    state.log("finished")
    return JSONResponse(_final_response(state))


def _final_response(state: _Chat) -> dict[str, Any]:
    choices = [
        {
            "index": index,
            "message": {"role": state.role, "content": state.echo + choice.text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None, "reasoning": None},
            "logprobs": state.logprobs_json(choice.token_ids, choice.logprobs),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        for index, choice in enumerate(state.choices)
    ]
    return {"id": state.id, "object": "chat.completion", "created": state.created, "model": state.ctx.model_name,
            "choices": choices, "service_tier": None, "system_fingerprint": None, "usage": state.usage(),
            "prompt_logprobs": None}


async def _stream(state: _Chat, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    options = state.request.stream_options
    continuous = bool(options and options.include_usage and options.continuous_usage_stats)
    status = "aborted"
    try:
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
                body: dict[str, Any] = {"index": index, "delta": {"content": text},
                                        "logprobs": state.logprobs_json(ids, positions),
                                        "finish_reason": choice.finish_reason if done else None}
                if done:
                    body["stop_reason"] = choice.stop_reason
                yield sse(state.chunk([body], continuous))
        if options and options.include_usage:
            yield sse(state.chunk([], with_usage=True))
        status = "finished"
    except APIError as e:
        status = "error"
        yield e.sse_event()
    except Exception as e:
        status = "error"
        yield engine_error(state.ctx, e).sse_event()
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
        state.log(status)
    yield SSE_DONE
