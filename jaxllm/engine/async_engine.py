"""`AsyncEngine`: the `LLMEngine` loop on its own thread, fed and drained from asyncio.

    asyncio task: generate() -> validate -> command queue ──▶ engine thread: add/abort, step()
    _Stream per request ◀── one loop.call_soon_threadsafe per step (all its outputs) ◀──┘

A stream holds at most one pending output: when its consumer has not taken the last one yet, the
next is merged into it (`merge_delta`), as vLLM's output collector does. A client that reads slower
than the engine steps (or an event loop busy with a thousand streams) then gets several tokens per
chunk instead of a backlog that grows every step.

Only the engine thread touches the `LLMEngine`. It sleeps on an Event while there is no work.
If a step raises, the engine is dead: every open stream raises `EngineDeadError` (caused by the
original error) and new requests are refused with it.

With `publish` (process 0 of a multi-process run), each loop iteration's engine calls are sent to
the other processes before the step, and a final stop message when the loop ends
(`jaxllm.engine.replication`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.engine.replication import EngineCall, Publish, StepMessage
from jaxllm.outputs import RequestOutput, merge_delta
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class _Stream:
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


def _deliver_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.deliver(output)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, publish: Publish | None = None) -> None:
        self._engine = engine
        self._publish = publish
        self._journal: list[EngineCall] = []  # engine calls of this loop iteration (when publishing)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._commands: list[Callable[[], None]] = []  # run on the engine thread, in order
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead_error: BaseException | None = None

    tokenizer = property(lambda self: self._engine.tokenizer)
    config = property(lambda self: self._engine.config)
    max_model_len = property(lambda self: self._engine.max_model_len)
    vocab_size = property(lambda self: self._engine.vocab_size)
    eos_token_ids = property(lambda self: self._engine.eos_token_ids)

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead_error

    def start(self) -> None:
        assert self._thread is None, "already started"
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(EngineDeadError("the engine was shut down"))

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
                       prompt: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """DELTA outputs of one request; the last has finished=True. Closing the iterator aborts the request."""
        self._raise_if_dead()
        self._engine.validate_request(prompt_token_ids, sampling_params)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:  # NOTE: checked under the lock the dying loop takes, so no stream is orphaned
            self._raise_if_dead()
            if request_id in self._streams:
                raise ValueError(f"Request id {request_id} is already running.")
            self._streams[request_id] = stream
        self._submit(lambda: self._add(request_id, prompt_token_ids, sampling_params, prompt, cache_salt))
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
                self._close_stream(request_id)
                self._submit(lambda: self._call("abort_request", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a final output whose finish_reason is "abort"."""
        self._submit(lambda: self._call("abort_request", request_id))

    def metrics(self) -> EngineMetrics:
        return self._engine.metrics.snapshot()

    def num_free_pages(self) -> int:
        return self._engine.block_manager.num_free_pages

    @property
    def num_pages(self) -> int:
        return self._engine.block_manager.num_pages

    async def wait_idle(self, poll_s: float = 0.005) -> None:
        """Wait until no request is queued or running (tests)."""
        while not self.is_dead:
            with self._lock:
                idle = not self._commands and not self._streams
            if idle and not self._engine.has_unfinished_requests():
                return
            await asyncio.sleep(poll_s)

    # ---- engine thread ----

    def _submit(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
        self._wakeup.set()

    def _add(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
             prompt: str | None, cache_salt: str | None) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # cancelled before it reached the engine
        try:
            self._call("add_request", request_id, prompt_token_ids, sampling_params, prompt, cache_salt, delta=True)
        except ValueError as e:
            self._close_stream(request_id)
            stream.put(e)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """An add/abort on the engine, journaled with its outcome when publishing (replayed even if it
        raised, so a follower that disagrees notices)."""
        raised = False
        try:
            getattr(self._engine, method)(*args, **kwargs)
        except ValueError:
            raised = True
            raise
        finally:
            if self._publish is not None:
                self._journal.append(EngineCall(method, args, kwargs, raised=raised))

    def _publish_iteration(self, step: bool) -> None:
        if self._publish is not None and (self._journal or step):
            calls, self._journal = self._journal, []
            self._publish(StepMessage(calls, step))

    def _close_stream(self, request_id: str) -> _Stream | None:
        with self._lock:
            return self._streams.pop(request_id, None)

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._engine.has_unfinished_requests():
                    # NOTE: clear after waking and before taking commands, so a command submitted
                    # in between is never missed.
                    self._wakeup.wait()
                    self._wakeup.clear()
                with self._lock:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                stepping = self._engine.has_unfinished_requests()
                self._publish_iteration(stepping)
                if stepping:
                    self._deliver(self._engine.step())
        except BaseException as e:  # any failure kills the engine
            logger.exception("engine loop died")
            with self._lock:
                self._dead_error = e
                streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                stream.put(self._dead())
        finally:
            if self._publish is not None:
                try:
                    self._publish(StepMessage([], step=False, stop=True, failed=self._dead_error is not None))
                except Exception:  # the other processes then fail on their own (runtime timeouts)
                    logger.exception("could not tell the other processes to stop")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs to their streams, with one wake-up per event loop.

        NOTE: each `call_soon_threadsafe` writes to the loop's self-pipe and takes its lock: one per
        output (hundreds per step when serving many streams) cost the engine thread and the event
        loop more than the handoff itself.
        """
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
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

    def _dead(self) -> EngineDeadError:
        error = EngineDeadError(f"the engine loop died: {self._dead_error!r}")
        error.__cause__ = self._dead_error
        return error

    def _raise_if_dead(self) -> None:
        if self._dead_error is not None:
            raise self._dead()
