"""Generation -> HTTP: submitting a request's prompts, merging their outputs, SSE events, the request log
line, and aborting on client disconnect.

    start_generation(engine, prompts, params, ...)  -> (prompt index, RequestOutput) as they come
    to_sse(chunks, log, engine)                     -> "data: {...}" events, an error event, "data: [DONE]"
    collect(outputs, log, engine)                   -> every output, for a non-streamed response

Every path that stops consuming the engine's outputs closes them (`aclose`), which aborts the request in
the engine and frees its KV pages: a finished response, an error, a cancelled task, a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxllm.engine.client import EngineClient
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from serve.errors import generation_error
from serve.inputs import EnginePrompt

request_logger = logging.getLogger("jaxllm.serve.requests")

_DONE = object()


# NOTE: JSON leaves U+0085, U+2028 and U+2029 raw, and line readers built on str.splitlines
# (httpx's aiter_lines, for one) end an SSE line there, cutting the JSON in two. Escape them.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: dict[str, Any]) -> str:
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events; the body iterator is always closed, however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: starlette cancels the stream on disconnect; when that lands in `send`, the generator
            # is suspended at a `yield` and would only be closed by the garbage collector.
            with contextlib.suppress(Exception):
                await self._content.aclose()  # type: ignore[attr-defined]


async def merge_outputs(
    generators: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(generator index, output) from all generators as they come; closes all of them on exit."""
    try:
        if len(generators) == 1:
            async for out in generators[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, _DONE))
            except Exception as e:  # handed to the consumer, which re-raises it
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for gen in generators:
            with contextlib.suppress(Exception):
                await gen.aclose()  # type: ignore[attr-defined]


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it if the client disconnects first (call after the body is read)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)  # nobody reads it: the client is gone
    return task.result()


def start_generation(engine: EngineClient, prompts: list[EnginePrompt], params: list[SamplingParams],
                     request_ids: list[str], *, cache_salt: str | None, default_max_tokens: int | None,
                     error_params: dict[str, str] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Validate every prompt (a 400 before the response starts, and nothing sent), submit them, and merge their
    outputs, as (prompt index, output)."""
    try:
        commands = [engine.prepare(prompt.token_ids, sp, request_id, prompt=prompt.text, cache_salt=cache_salt,
                                   default_max_tokens=default_max_tokens)
                    for prompt, sp, request_id in zip(prompts, params, request_ids, strict=True)]
    except Exception as e:
        raise generation_error(e, engine_dead=engine.is_dead, params=error_params) from e
    return merge_outputs(engine.submit_all(commands, request_ids))


@dataclass
class RequestLog:
    """One request's line of --enable-log-requests (never headers, so never the API key)."""

    enabled: bool
    request_id: str
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = self.start or time.perf_counter()

    def done(self, status: str) -> None:
        if self.enabled:
            request_logger.info("request %s: prompt_tokens=%d output_tokens=%d latency=%.3fs status=%s",
                                self.request_id, self.prompt_tokens, self.output_tokens,
                                time.perf_counter() - self.start, status)


async def to_sse(chunks: AsyncIterator[dict[str, Any]], log: RequestLog, engine: EngineClient,
                 error_params: dict[str, str] | None = None) -> AsyncIterator[str]:
    """A stream's events: each chunk, an error as an SSE error event, then [DONE]; the log line at the end.
    Closing it closes `chunks` (which closes the engine's outputs, aborting an unfinished request)."""
    status = "aborted"
    try:
        async for chunk in chunks:
            yield sse(chunk)
        status = "finished"
    except Exception as e:
        status = "error"
        yield generation_error(e, engine_dead=engine.is_dead, params=error_params).sse_event()
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        log.done(status)
    yield SSE_DONE


async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]], log: RequestLog, engine: EngineClient,
                  error_params: dict[str, str] | None = None) -> list[tuple[int, RequestOutput]]:
    """Every output of a non-streamed request, in order; an error as the API error (the request aborted)."""
    try:
        return [item async for item in outputs]
    except Exception as e:
        log.done("error")
        raise generation_error(e, engine_dead=engine.is_dead, params=error_params) from e
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
