"""`AsyncEngine`: the `LLMEngine` loop on its own thread, fed and drained from asyncio.

    asyncio task: generate() -> validate -> command queue ──▶ engine thread: add/abort, step()
    OutputStream per request ◀── one loop.call_soon_threadsafe per step (all its outputs) ◀──┘

Streams, and how a lagging consumer gets merged outputs: `jaxllm.engine.streams`.

Only the engine thread touches the `LLMEngine`. It sleeps on an Event while there is no work.
If a step raises, the engine is dead: every open stream raises `EngineDeadError` (caused by the
original error) and new requests are refused with it.

With `publish` (process 0 of a multi-process run), each loop iteration's engine calls are sent to
the other processes before the step, and a final stop message when the loop ends
(`jaxllm.engine.replication`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.engine.replication import EngineCall, Publish, StepMessage
from jaxllm.engine.streams import EngineDeadError, OpenStreams, consume, engine_dead_error
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, publish: Publish | None = None) -> None:
        self._engine = engine
        self._publish = publish
        self._journal: list[EngineCall] = []  # engine calls of this loop iteration (when publishing)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._commands: list[Callable[[], None]] = []  # run on the engine thread, in order
        self._streams = OpenStreams()
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
        self._engine.shutdown()
        self._streams.fail_all(lambda: EngineDeadError("the engine was shut down"))

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
                       prompt: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """DELTA outputs of one request; the last has finished=True. Closing the iterator aborts the request."""
        self._raise_if_dead()
        self._engine.validate_request(prompt_token_ids, sampling_params)
        stream = self._streams.open(request_id)
        self._submit(lambda: self._add(request_id, prompt_token_ids, sampling_params, prompt, cache_salt))

        def abandon() -> None:
            self._streams.close(request_id)
            self._submit(lambda: self._call("abort_request", request_id))

        async with contextlib.aclosing(consume(stream, abandon)) as outputs:
            async for output in outputs:
                yield output

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
                idle = not self._commands and not len(self._streams)
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
        if self._streams.get(request_id) is None:
            return  # cancelled before it reached the engine
        try:
            self._call("add_request", request_id, prompt_token_ids, sampling_params, prompt, cache_salt, delta=True)
        except ValueError as e:
            self._streams.reject(request_id, e)

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
                    self._streams.deliver(self._engine.step())
        except BaseException as e:  # any failure kills the engine
            logger.exception("engine loop died")
            self._dead_error = e
            self._streams.fail_all(self._dead)
        finally:
            if self._publish is not None:
                try:
                    self._publish(StepMessage([], step=False, stop=True, failed=self._dead_error is not None))
                except Exception:  # the other processes then fail on their own (runtime timeouts)
                    logger.exception("could not tell the other processes to stop")

    def _dead(self) -> EngineDeadError:
        assert self._dead_error is not None
        return engine_dead_error(self._dead_error)

    def _raise_if_dead(self) -> None:
        if self._dead_error is not None:
            raise self._dead()
