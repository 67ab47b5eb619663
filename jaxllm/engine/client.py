"""`EngineClient`: what the server (and tests) hold of an engine core that runs elsewhere.

    generate() ── validate (ValidationError: nothing is sent) ── AddRequest ──▶ the core (a thread, a process)
    GenerationStream ◀── RequestStream ◀── _deliver(EngineOutputs of a step) ◀──┘

Two transports share it: `AsyncEngine` (the core on a thread of this process) and `ProcessEngine` (the
core in a child process). Each supplies `_send`, `metrics`, `_idle` and `shutdown`; outputs arrive on the
core's thread or the pipe's reader thread, one batch per step.

A request's stream holds at most one pending output: when its consumer has not taken the last one yet,
the next is merged into it (`merge_delta`), as vLLM's output collector does. A client that reads slower
than the engine steps (or an event loop busy with a thousand streams) then gets several tokens per chunk
instead of a backlog that grows every step.

NOTE: the engine knows each request by a fresh id, "<request id>#<n>": a client's id can come back
(X-Request-Id) while the outputs or the abort of its last use are still in flight, and two requests
may share one id, as vLLM allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

from jaxllm.engine.core import Abort, AddRequest, EngineCommand, EngineInfo
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.outputs import EngineOutput, RequestOutput, merge_delta
from jaxllm.sampling_params import RequestOutputKind, SamplingParams


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
        # `async for` left by an exception): its request must not run on, holding KV pages. The abandon
        # runs on the consumer's event loop, never here: a garbage collection can run this on any thread,
        # inside a section that holds one of the locks the abandon takes.
        if not self._done:
            self._done = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to abort for
                self._stream.loop.call_soon_threadsafe(self._abandon)


@dataclass(slots=True)
class _Submitted:
    request_id: str  # the caller's
    prompt_token_ids: list[int]
    prompt: str | None


class EngineClient:
    def __init__(self, info: EngineInfo) -> None:
        self.info = info
        self._streams = OpenStreams()
        self._submitted: dict[str, _Submitted] = {}  # by engine id
        self._engine_ids: dict[str, str] = {}  # request id -> the engine id of its latest use
        self._next_id = itertools.count()
        self._ids_lock = threading.Lock()  # the two maps change on the event loop and on the delivering thread
        self._dead_error: BaseException | None = None

    # ---- the transport's part ----

    def _send(self, *commands: EngineCommand) -> None:
        raise NotImplementedError

    def _idle(self) -> bool:
        """Whether the core has taken every command sent and has no request left."""
        raise NotImplementedError

    def metrics(self) -> EngineMetrics:
        raise NotImplementedError

    def start(self) -> None:
        """Start the core where it has not started yet (the server's lifespan calls it)."""

    def shutdown(self) -> None:
        raise NotImplementedError

    # ---- requests ----

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead_error

    def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
                 prompt: str | None = None, cache_salt: str | None = None,
                 default_max_tokens: int | None = None) -> GenerationStream:
        """Submit a request now; its DELTA outputs come through the returned stream (see `GenerationStream`).
        `default_max_tokens` caps its output budget (`jaxllm.validation.validate_request`).

        Raises `jaxllm.validation.ValidationError` for a request the engine cannot serve (nothing is sent),
        and `EngineDeadError` once the engine has died."""
        command = self.prepare(prompt_token_ids, sampling_params, request_id, prompt=prompt, cache_salt=cache_salt,
                               default_max_tokens=default_max_tokens)
        return self.submit(command, request_id)

    def prepare(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
                prompt: str | None = None, cache_salt: str | None = None,
                default_max_tokens: int | None = None) -> AddRequest:
        """`generate`'s validation alone (nothing is sent): a request of several prompts checks them all first."""
        if self._dead_error is not None:
            raise engine_dead_error(self._dead_error)
        engine_id = f"{request_id}#{next(self._next_id)}"
        params = sampling_params.clone(output_kind=RequestOutputKind.DELTA)
        return self.info.new_request(engine_id, prompt_token_ids, params, prompt=prompt, cache_salt=cache_salt,
                                     default_max_tokens=default_max_tokens)

    def submit(self, command: AddRequest, request_id: str) -> GenerationStream:
        """Send a prepared request; its outputs come back under `request_id` (the caller's)."""
        return self.submit_all([command], [request_id])[0]

    def submit_all(self, commands: list[AddRequest], request_ids: list[str]) -> list[GenerationStream]:
        """Send the prepared requests of one user request (its prompts), in one message; their outputs come back
        under `request_ids` (the caller's). They share one source, so they take turns with other requests to
        enter the engine's scheduler rather than queue ahead of them all (`jaxllm.engine.admission`)."""
        if len(commands) > 1:
            commands = [dataclasses.replace(command, source=commands[0].request_id) for command in commands]
        streams = [self._open(command, request_id) for command, request_id in zip(commands, request_ids, strict=True)]
        self._send(*commands)
        return streams

    def _open(self, command: AddRequest, request_id: str) -> GenerationStream:
        """The stream of a request about to be sent."""
        engine_id = command.request_id
        stream = self._streams.open(engine_id)
        with self._ids_lock:
            self._submitted[engine_id] = _Submitted(request_id, command.prompt_token_ids, command.prompt)
            self._engine_ids[request_id] = engine_id

        def abandon() -> None:
            self._streams.close(engine_id)
            self._forget(engine_id)
            self._send(Abort((engine_id,)))

        return GenerationStream(stream, abandon)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a final output whose finish_reason is "abort"."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self._send(Abort((engine_id,)))

    def num_free_pages(self) -> int:
        return self.metrics().num_free_pages

    async def wait_idle(self, poll_s: float = 0.005) -> None:
        """Wait until no request is queued or running and the core has taken every command (tests)."""
        while not self.is_dead:
            if not len(self._streams) and self._idle():
                return
            await asyncio.sleep(poll_s)

    # ---- outputs, from the core's thread or the pipe's reader ----

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        delivered = []
        for out in outputs:
            submitted = self._forget(out.request_id) if out.finished else self._submitted.get(out.request_id)
            if submitted is not None:  # else its consumer has gone
                delivered.append((out.request_id, out.to_request_output(
                    submitted.request_id, submitted.prompt, submitted.prompt_token_ids)))
        self._streams.deliver(delivered)

    def _forget(self, engine_id: str) -> _Submitted | None:
        with self._ids_lock:
            submitted = self._submitted.pop(engine_id, None)
            if submitted is not None and self._engine_ids.get(submitted.request_id) == engine_id:
                del self._engine_ids[submitted.request_id]
            return submitted

    def _die(self, cause: BaseException) -> None:
        """The core is gone: every open stream, and every later request, raises `EngineDeadError`."""
        self._dead_error = cause
        self._streams.fail_all(lambda: engine_dead_error(cause))

    def _close_streams(self) -> None:
        self._streams.fail_all(lambda: EngineDeadError("the engine was shut down"))
