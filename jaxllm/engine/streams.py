"""Per-request output streams from an engine loop (any thread) to asyncio consumers.

Used by both engine clients: `AsyncEngine` (engine loop on a thread) and `ProcessEngine` (engine
loop in a child process, outputs handed over by a reader thread).

A stream holds at most one pending output: when its consumer has not taken the last one yet, the
next is merged into it (`merge_delta`), as vLLM's output collector does. A client that reads slower
than the engine steps (or an event loop busy with a thousand streams) then gets several tokens per
chunk instead of a backlog that grows every step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from jaxllm.outputs import RequestOutput, merge_delta


class EngineDeadError(RuntimeError):
    pass


def engine_dead_error(cause: BaseException) -> EngineDeadError:
    """What a stream (or a new request) raises once the engine loop has died of `cause`."""
    error = EngineDeadError(f"the engine loop died: {cause!r}")
    error.__cause__ = cause
    return error


class OutputStream:
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


def _deliver_all(items: list[tuple[OutputStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.deliver(output)


class OpenStreams:
    """The streams of the requests in flight, by request id; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, OutputStream] = {}
        self._dead: Callable[[], BaseException] | None = None

    def open(self, request_id: str) -> OutputStream:
        """A new stream on the running event loop; raises the engine's death or a duplicate id."""
        stream = OutputStream(asyncio.get_running_loop())
        with self._lock:  # NOTE: checked under the lock `fail_all` takes, so no stream is orphaned
            if self._dead is not None:
                raise self._dead()
            if request_id in self._streams:
                raise ValueError(f"Request id {request_id} is already running.")
            self._streams[request_id] = stream
        return stream

    def get(self, request_id: str) -> OutputStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def close(self, request_id: str) -> OutputStream | None:
        with self._lock:
            return self._streams.pop(request_id, None)

    def reject(self, request_id: str, error: BaseException) -> None:
        """The engine refused the request: its consumer gets the error from its first `__anext__`."""
        stream = self.close(request_id)
        if stream is not None:
            stream.put(error)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs to their streams, with one wake-up per event loop.

        NOTE: each `call_soon_threadsafe` writes to the loop's self-pipe and takes its lock: one per
        output (hundreds per step when serving many streams) cost the engine thread and the event
        loop more than the handoff itself.
        """
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, RequestOutput]]] = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if output.finished:
                    self._streams.pop(output.request_id, None)
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


async def consume(stream: OutputStream, abandon: Callable[[], None]) -> AsyncIterator[RequestOutput]:
    """A stream's outputs until the finished one; `abandon()` when the consumer leaves before it.

    NOTE: a generator that re-yields these must close this one in its own `aclose()` (wrap it in
    `contextlib.aclosing`): a plain `async for` leaves it to the event loop's finalizer, and the abort
    (and the request id) would wait for it."""
    finished = False
    try:
        while True:
            item = await stream.next()
            if isinstance(item, BaseException):
                finished = True  # the engine already dropped it
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:  # the consumer went away (disconnect, cancellation): free its pages now
            abandon()
