"""`AsyncEngine`: the engine core's loop on a thread of this process, fed and drained from asyncio.

    asyncio: generate() ─ validate ─ AddRequest ─▶ CommandQueue ─▶ engine thread: EngineCore.run()
    GenerationStream per request ◀── one loop.call_soon_threadsafe per step (all its outputs) ◀──┘

Only the engine thread touches the `LLMEngine` (but for the gauges `wait_idle` reads). If the loop
raises, the engine is dead: every open stream raises `EngineDeadError` (caused by the original error)
and new requests are refused with it.

With `publish` (process 0 of a multi-process server), each iteration of the loop is sent to the other
processes, which replay it (`jaxllm.engine.core.follow`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from jaxllm.engine.client import EngineClient
from jaxllm.engine.core import CommandQueue, EngineCommand, EngineCore, EngineInfo, Publish, Shutdown
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.metrics import EngineMetrics

logger = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine, publish: Publish | None = None, *,
                 default_sampling: dict[str, Any] | None = None, chat_template: str | None = None,
                 model_type: str | None = None) -> None:
        super().__init__(EngineInfo.describe(engine, default_sampling, chat_template, model_type))
        self._core = EngineCore(engine, publish=publish)
        self._commands = CommandQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None, "already started"
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._commands.put(Shutdown())
        if self._thread is not None:
            self._thread.join()
        self._core.close()
        self._close_streams()

    def metrics(self) -> EngineMetrics:
        return self._core.engine.metrics_snapshot()

    def _send(self, *commands: EngineCommand) -> None:
        self._commands.put(*commands)

    def _idle(self) -> bool:
        return not self._commands.has_pending() and not self._core.engine.has_unfinished_requests()

    def _run(self) -> None:
        try:
            self._core.run(self._commands, self._deliver)
        except BaseException as e:  # any failure kills the engine
            logger.exception("engine loop died")
            self._die(e)
