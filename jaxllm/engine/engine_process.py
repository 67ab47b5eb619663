"""`ProcessEngine`: the engine core's loop in a child process, behind the same client as `AsyncEngine`.

    HTTP process                                                engine process (spawned)
    generate() ─ [AddRequest] / [Abort] ─▶ sender thread ─▶ pipe ─▶ reader thread ─▶ CommandQueue ─▶ EngineCore.run()
    GenerationStream per request ◀── reader thread ◀── ("step", [EngineOutput], stats) ◀── pipe ◀──┘

NOTE: in one process the event loop (HTTP parsing, JSON, a socket write per chunk) and the engine
loop (scheduling, batch building, detokenizing) take turns on one GIL. Here each loop has its own
interpreter, as vLLM's API server and engine core have (bench/RESULTS.md has the measured gain). A
step's outputs cross the pipe as the engine made them, tuples (`EngineOutput`), without their prompts
(the HTTP process keeps those).

Commands leave through a sender thread, batched: a burst of a thousand new requests would fill the
pipe while the child is inside a step, and the event loop must not wait on it.

The child is spawned (never forked: the HTTP process may hold threads) with a picklable factory
that builds the engine there (`jaxllm.serving.build_served_engine`, or a stand-in runner in tests);
the constructor waits until it is built and takes its `EngineInfo`. If the child dies, or its loop
raises, every open stream raises `EngineDeadError` and new requests are refused, as with `AsyncEngine`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from jaxllm.engine.client import EngineClient
from jaxllm.engine.core import CommandQueue, EngineCommand, EngineCore, EngineInfo, Iteration, Shutdown
from jaxllm.engine.interfaces import ModelRunnerProtocol
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.outputs import EngineOutput

logger = logging.getLogger(__name__)

# How often a busy engine process reports its metrics; an idle one reports after every change.
REPORT_STATS_INTERVAL_S = 0.1
# How often an idle engine reports while its buckets load in the background (the status page's compile state).
REPORT_LOADING_INTERVAL_S = 1.0
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"

# Builds the engine in the child: returns a `jaxllm.build.EngineParts` (.engine, .generation_defaults,
# .chat_template).
EngineFactory = Callable[[], Any]


@dataclass
class EngineStats:
    metrics: EngineMetrics
    commands_taken: int  # commands the engine's loop has taken so far
    busy: bool  # requests queued or running there


# ---- the engine process ----


class _CountingQueue(CommandQueue):
    """The child's command queue, counting what the loop has taken (for `ProcessEngine.wait_idle`)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def receive(self, block: bool) -> Iteration:
        iteration = super().receive(block)
        self.taken += len(iteration.commands)
        return iteration


def run_engine_process(factory: EngineFactory, conn: Connection, log_level: int) -> None:
    """The child's main: build the engine, report it, then run its loop until told to stop."""
    # NOTE: Ctrl-C reaches the whole process group; the HTTP process handles it, drains its requests and
    # then stops us in order. SIGTERM keeps its default: multiprocessing ends a daemon child with it when
    # the HTTP process exits without `shutdown()`, and waits for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        parts = factory()
        engine: LLMEngine = parts.engine
        conn.send(("ready", EngineInfo.describe(engine, parts.generation_defaults.sampling, parts.chat_template,
                                                parts.model_type)))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))
        return
    commands = _CountingQueue()
    threading.Thread(target=_read_commands, args=(conn, commands), name="jaxllm-commands", daemon=True).start()
    threading.Thread(target=wake_while_loading, args=(engine.runner, commands), name="jaxllm-loading-reports",
                     daemon=True).start()
    core = EngineCore(engine)
    try:
        core.run(commands, _stats_sink(engine, commands, conn))
    except (EOFError, OSError):
        return  # the HTTP process is gone
    except BaseException:
        logger.exception("engine loop died")
        with contextlib.suppress(OSError):
            conn.send(("dead", traceback.format_exc()))
    finally:
        core.close()  # NOTE: or the exit waits for every bucket still queued to load


def _read_commands(conn: Connection, commands: CommandQueue) -> None:
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):  # the HTTP process is gone
            commands.put(Shutdown())
            return
        commands.put(*batch)


def wake_while_loading(runner: ModelRunnerProtocol, commands: CommandQueue,
                       interval_s: float = REPORT_LOADING_INTERVAL_S) -> None:
    """Wake the loop every `interval_s` until every forward bucket has loaded, and once after: an idle loop
    reports its metrics only when woken, and the status page follows the loading through them."""
    while not all(loaded for *_, loaded in runner.compile_state().forward_buckets):
        time.sleep(interval_s)
        commands.wake()
    commands.wake()


def _stats_sink(engine: LLMEngine, commands: _CountingQueue, conn: Connection) -> Callable[[list[EngineOutput]], None]:
    last_report = 0.0

    def sink(outputs: list[EngineOutput]) -> None:
        nonlocal last_report
        busy, now = engine.has_unfinished_requests(), time.monotonic()
        stats = None
        if not busy or now - last_report >= REPORT_STATS_INTERVAL_S:
            stats = EngineStats(engine.metrics_snapshot(), commands.taken, busy)
            last_report = now
        if outputs or stats is not None:
            conn.send(("step", outputs, stats))

    return sink


# ---- the HTTP process ----


class ProcessEngine(EngineClient):
    def __init__(self, factory: EngineFactory, while_building: Callable[[], object] = lambda: None) -> None:
        """Spawn the engine process and wait until it has built the engine; `while_building` runs meanwhile."""
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine_process, name="jaxllm-engine", daemon=True,
                                        args=(factory, child_conn, logging.getLogger().getEffectiveLevel()))
        self._process.start()
        child_conn.close()
        try:
            while_building()
            message = self._conn.recv()
            if message[0] != "ready":
                raise RuntimeError(f"the engine could not be built:\n{message[1]}")
        except EOFError:
            self._stop_process()
            raise RuntimeError(
                f"the engine process exited during start-up (exit code {self._process.exitcode})") from None
        except BaseException:  # its error, or Ctrl-C while the model loads: the child must not outlive us
            self._stop_process()
            raise
        super().__init__(message[1])
        self._send_lock = threading.Lock()
        self._num_sent = 0
        self._outbox: queue.SimpleQueue[tuple[EngineCommand, ...] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="jaxllm-engine-sender", daemon=True)
        self._sender.start()
        limits = self.info.limits
        self._stats = EngineStats(EngineMetrics(limits.max_model_len, num_free_pages=limits.num_pages), 0, busy=False)
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="jaxllm-engine-reader", daemon=True)
        self._reader.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._send(Shutdown())
        self._outbox.put(None)
        self._sender.join(5)
        # NOTE: a dead engine may never have got the stop (its sender gone): no 30 s wait for it.
        self._stop_process(timeout_s=1 if self.is_dead else 30)
        self._reader.join(5)
        self._close_streams()

    def _stop_process(self, timeout_s: float = 5) -> None:
        """Wait for the child to exit (it exits on Shutdown or when the pipe closes), killing it after `timeout_s`."""
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def metrics(self) -> EngineMetrics:
        return self._stats.metrics

    def _idle(self) -> bool:
        stats = self._stats
        return not stats.busy and stats.commands_taken == self._num_sent

    def _send(self, *commands: EngineCommand) -> None:
        with self._send_lock:  # counted in queue order
            self._num_sent += len(commands)
            self._outbox.put(commands)

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            batch = list(message)
            with contextlib.suppress(queue.Empty):
                while (message := self._outbox.get_nowait()) is not None:
                    batch += message
            try:
                self._conn.send(batch)
            except (OSError, ValueError):  # the engine process is gone: the reader reports it
                return
            except Exception as e:  # a command that cannot be pickled: nothing can be sent in order any more
                self._die(RuntimeError(f"could not send a command to the engine process: {e!r}"))
                return
            if message is None:
                return

    def _read(self) -> None:
        try:
            self._read_loop()
        except Exception as e:  # a bug here must not leave every stream waiting
            logger.exception("reading the engine process' outputs failed")
            self._die(RuntimeError(f"reading the engine process' outputs failed: {e!r}"))

    def _read_loop(self) -> None:
        while True:
            try:
                kind, *body = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._process.join(5)
                    self._die(RuntimeError(f"the engine process exited (exit code {self._process.exitcode})"))
                return
            if kind == "dead":
                self._die(RuntimeError(f"the engine loop raised in the engine process:\n{body[0]}"))
                return
            outputs, stats = body
            self._deliver(outputs)
            if stats is not None:
                self._stats = stats

    def _die(self, cause: BaseException) -> None:
        logger.error("%s", cause)
        super()._die(cause)
