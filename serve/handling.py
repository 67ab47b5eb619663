"""Steps every generation handler shares: parse, check the model, start the engine, map its errors."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from serve.engine_client import ServingContext
from serve.errors import APIError, from_validation_error
from serve.prompts import EnginePrompt
from serve.streaming import SSE_DONE, merge_outputs, sse

RequestT = TypeVar("RequestT", bound=BaseModel)
# A \uD800-\uDFFF escape: json.loads leaves an unpaired one in the string, which the tokenizer cannot encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper bodies parse but blow the recursion limit later (the chat template's data walk, deepcopy).
_MAX_DEPTH = 128
_TOO_DEEP = f"The request body is nested too deeply (more than {_MAX_DEPTH} levels of arrays and objects)."


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}", param=None) from e
    except RecursionError as e:
        raise APIError(_TOO_DEEP, param=None) from e
    if body.count(b"[") + body.count(b"{") > _MAX_DEPTH and _deeper_than(value, _MAX_DEPTH):
        raise APIError(_TOO_DEEP, param=None)
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            raise APIError("The request body is not valid JSON: it holds an unpaired UTF-16 surrogate escape "
                           f"({e.object[e.start:e.end].encode('unicode_escape').decode()}), which is not a "
                           "character.", param=None) from e
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (iteratively: no recursion limit here)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse(model: type[RequestT], body: Any) -> RequestT:
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


def check_model(ctx: ServingContext, name: str | None) -> None:
    if name is not None and name not in ctx.served_model_names:
        raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, param="model")


def base_request_id(request: Request, body_id: str | None) -> str:
    """vLLM's rule: the X-Request-Id header, else the body's `request_id`, else a random id."""
    return request.headers.get("x-request-id") or body_id or uuid.uuid4().hex


def engine_error(ctx: ServingContext, err: BaseException) -> APIError:
    """An exception out of the engine: 400 for a request the engine rejects, 500 otherwise."""
    if ctx.engine.is_dead:
        cause = ctx.engine.dead_error or err
        return APIError(f"The engine died: {cause!r}", HTTPStatus.INTERNAL_SERVER_ERROR)
    if isinstance(err, ValueError):
        return APIError(str(err))
    return APIError(f"Internal error: {err!r}", HTTPStatus.INTERNAL_SERVER_ERROR)


def check_engine_alive(ctx: ServingContext) -> None:
    if ctx.engine.is_dead:
        raise APIError(f"The engine died: {ctx.engine.dead_error!r}", HTTPStatus.INTERNAL_SERVER_ERROR)


async def start_generation(
    ctx: ServingContext,
    prompts: list[EnginePrompt],
    params: list[SamplingParams],
    request_ids: list[str],
    cache_salt: str | None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every prompt and wait for the first output, so a request the engine rejects (ValueError
    from the first `__anext__`) is still a plain 400 rather than an error inside a stream."""
    check_engine_alive(ctx)
    generators = [
        ctx.engine.generate(p.token_ids, sp, rid, prompt=p.text, cache_salt=cache_salt)
        for p, sp, rid in zip(prompts, params, request_ids, strict=True)
    ]
    merged = merge_outputs(generators)
    try:
        first = await merged.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception as e:
        await merged.aclose()
        raise engine_error(ctx, e) from e
    return _prepend(first, merged)


async def _prepend(
    first: tuple[int, RequestOutput] | None, rest: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def finish_sse(state: Any, outputs: AsyncIterator[Any], chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """What every stream ends with: the usage chunk (include_usage), an error as an SSE error event,
    the engine stream closed (which aborts an unfinished request), the log line, then [DONE]."""
    options = state.request.stream_options
    status = "aborted"
    try:
        async for event in chunks:
            yield event
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
        await chunks.aclose()  # type: ignore[attr-defined]
        await outputs.aclose()  # type: ignore[attr-defined]
        state.log(status)
    yield SSE_DONE


async def collect(state: Any, outputs: AsyncIterator[Any], update: Any) -> None:
    """Run a non-streaming request to its end: `update(prompt_index, output)` per engine output;
    errors logged and mapped to API errors; the engine stream closed (aborting it on failure)."""
    try:
        async for prompt_index, res in outputs:
            update(prompt_index, res)
    except APIError:
        state.log("error")
        raise
    except Exception as e:
        state.log("error")
        raise engine_error(state.ctx, e) from e
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    state.log("finished")


def continuous_usage(request: Any) -> bool:
    """stream_options.continuous_usage_stats: a usage block in every chunk (needs include_usage)."""
    options = request.stream_options
    return bool(options and options.include_usage and options.continuous_usage_stats)
