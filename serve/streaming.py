"""Engine outputs -> HTTP: merging several requests' outputs, SSE, and aborting on client disconnect.

Every path that stops consuming an engine generator closes it (`aclose`), which aborts the request in
the engine and frees its KV pages: a finished response, an error, a cancelled task, a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxllm.outputs import RequestOutput

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
