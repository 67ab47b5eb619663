"""Per-request output streams from an engine loop (any thread) to asyncio consumers.

`EngineClient` opens one `RequestStream` per request, keyed by the engine's id for it, and hands the
caller a `GenerationStream` over it. Outputs arrive from the engine's thread (in-thread engine) or the
reader thread of the engine process, one batch per step.

A stream holds at most one pending output: when its consumer has not taken the last one yet, the
next is merged into it (`merge_delta`), as vLLM's output collector does. A client that reads slower
than the engine steps (or an event loop busy with a thousand streams) then gets several tokens per
chunk instead of a backlog that grows every step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from jaxllm.outputs import RequestOutput, merge_delta


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error (e.g. its grammar did not compile); the message says why."""


def engine_dead_error(cause: BaseException) -> EngineDeadError:
    """What a stream (or a new request) raises once the engine loop has died of `cause`."""
    error = EngineDeadError(f"the engine loop died: {cause!r}")
    error.__cause__ = cause
    return error


class RequestStream:
    """One request's outputs on their way to its consumer; touched only on the consumer's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """From any thread."""
        try:
            self.loop.call_soon_threadsafe(self.deliver, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    def deliver(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        elif self._pending is None:
            self._pending = item
        else:
            merge_delta(self._pending, item)
        self._ready.set()

    async def next(self) -> RequestOutput | BaseException:
        """The outputs since the last call, merged; the engine's error once they are all taken."""
        await self._ready.wait()
        item, self._pending = self._pending, None
        if item is None:
            assert self._error is not None
            return self._error
        if self._error is None:
            self._ready.clear()
        return item


def _deliver_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.deliver(output)


class OpenStreams:
    """The streams of the requests in flight, by key; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._dead: Callable[[], BaseException] | None = None

    def open(self, key: str) -> RequestStream:
        """A new stream on the running event loop; raises the engine's death."""
        stream = RequestStream(asyncio.get_running_loop())
        with self._lock:  # NOTE: checked under the lock `fail_all` takes, so no stream is orphaned
            if self._dead is not None:
                raise self._dead()
            self._streams[key] = stream
        return stream

    def close(self, key: str) -> RequestStream | None:
        with self._lock:
            return self._streams.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def deliver(self, outputs: list[tuple[str, RequestOutput]]) -> None:
        """One step's outputs (by key) to their streams, with one wake-up per event loop.

        NOTE: each `call_soon_threadsafe` writes to the loop's self-pipe and takes its lock: one per
        output (hundreds per step when serving many streams) cost the engine thread and the event
        loop more than the handoff itself.
        """
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for key, output in outputs:
                stream = self._streams.pop(key, None) if output.finished else self._streams.get(key)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream, output))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Every open stream gets a fresh error from `make_error`; later `open`s raise one too."""
        with self._lock:
            self._dead = make_error
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(make_error())


class GenerationStream:
    """A request's DELTA outputs, for `async for`; the last has finished=True. A request the engine ended
    with an error raises `RequestFailedError`, a dead engine `EngineDeadError`.

    `aclose()` before the end (a disconnect, an error elsewhere) abandons the request, which aborts it in
    the engine and frees its KV pages; that holds even if it was never iterated. So does a cancellation
    of the task waiting on it."""

    def __init__(self, stream: RequestStream, abandon: Callable[[], None]) -> None:
        self._stream = stream
        self._abandon = abandon
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._stream.next()
        except asyncio.CancelledError:  # the consumer's task was cancelled while it waited: it has gone
            self._close()
            raise
        if isinstance(item, BaseException):
            self._done = True  # the engine already dropped it
            raise item
        if item.error is not None:
            self._done = True
            raise RequestFailedError(item.error)
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abandon()

    def __del__(self) -> None:
        # NOTE: a safety net for a consumer that drops the stream unfinished without closing it (a plain
        # `async for` left by an exception): its request must not run on, holding KV pages.
        self._close()
