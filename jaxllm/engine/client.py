"""`EngineClient`: what the server (and tests) hold of an engine core that runs elsewhere.

    generate() ── validate (ValidationError: nothing is sent) ── AddRequest ──▶ the core (a thread, a process)
    GenerationStream ◀── RequestStream ◀── _deliver(EngineOutputs of a step) ◀──┘

Two transports share it: `AsyncEngine` (the core on a thread of this process) and `ProcessEngine` (the
core in a child process). Each supplies `_send`, `metrics`, `_idle` and `shutdown`.

NOTE: the engine knows each request by a fresh id, "<request id>#<n>": a client's id can come back
(X-Request-Id) while the outputs or the abort of its last use are still in flight, and two requests
may share one id, as vLLM allows.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass

from jaxllm.engine.core import Abort, EngineCommand, EngineInfo
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.engine.streams import EngineDeadError, GenerationStream, OpenStreams, engine_dead_error
from jaxllm.outputs import EngineOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams


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
        if self._dead_error is not None:
            raise engine_dead_error(self._dead_error)
        engine_id = f"{request_id}#{next(self._next_id)}"
        params = sampling_params.clone(output_kind=RequestOutputKind.DELTA)
        command = self.info.new_request(engine_id, prompt_token_ids, params, prompt=prompt, cache_salt=cache_salt,
                                        default_max_tokens=default_max_tokens)
        stream = self._streams.open(engine_id)
        with self._ids_lock:
            self._submitted[engine_id] = _Submitted(request_id, command.prompt_token_ids, prompt)
            self._engine_ids[request_id] = engine_id
        self._send(command)

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
