"""`ProcessEngine`: the engine loop in a child process, served to asyncio as `AsyncEngine` serves it.

    HTTP process                                               engine process (spawned)
    generate() ── ("add", ...) / ("abort", id) ─▶ sender thread ─▶ pipe ─▶ add/abort, step()
    OutputStream per request ◀── reader thread ◀── ("step", outputs, rejected, stats) ◀──┘

NOTE: in one process the event loop (HTTP parsing, JSON, a socket write per chunk) and the engine
loop (scheduling, batch building, detokenizing) take turns on one GIL. On an H200 with 1000
streams the server made 5,900-6,100 output tokens/s where the offline engine made 10,700, with
either benchmark client. Here each loop has its own interpreter, as vLLM's API server and engine
core have. Each step's outputs cross the pipe packed as tuples, without their prompt ids (the HTTP
process keeps those): about 1 ms for 1000 outputs, pickling and unpickling, on the CPU machine.

Commands leave through a sender thread, batched: a burst of a thousand new requests would fill the
pipe while the child is inside a step, and the event loop must not wait on it.

The child is spawned (never forked: the HTTP process may hold threads) with a picklable factory
that builds the engine there (`jaxllm.build.build_engine`, or a stand-in runner in tests); the
constructor waits until it is built. If the child dies, or its loop raises, every open stream
raises `EngineDeadError` and new requests are refused, as with `AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.engine.streams import EngineDeadError, OpenStreams, consume, engine_dead_error
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How often a busy engine process reports its metrics; an idle one reports after every change.
STATS_INTERVAL_S = 0.1
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"

# Builds the engine in the child: returns an object with .engine (an LLMEngine), .generation_defaults
# and .chat_template (`jaxllm.build.EngineParts`).
EngineFactory = Callable[[], Any]


@dataclass
class EngineInfo:
    """What the HTTP process needs of the engine, sent once it is built."""

    config: EngineConfig
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    num_pages: int
    generation_defaults: Any
    chat_template: str | None


@dataclass
class EngineStats:
    metrics: EngineMetrics
    num_free_pages: int
    last_command: int  # sequence number of the last command the engine process applied
    busy: bool  # requests queued or running there


# One RequestOutput on the pipe: (request_id, finished, num_cached_tokens, prompt_logprobs, metrics,
# [(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)]).
PackedOutput = tuple[str, bool, int, Any, Any, list[tuple[Any, ...]]]


def pack_output(output: RequestOutput) -> PackedOutput:
    return (output.request_id, output.finished, output.num_cached_tokens, output.prompt_logprobs,
            output.metrics if output.finished else None,  # NOTE: the server reads none; dicts cost the most
            [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
             for c in output.outputs])


def unpack_output(packed: PackedOutput, request_id: str, prompt_token_ids: list[int],
                  prompt: str | None) -> RequestOutput:
    _, finished, num_cached_tokens, prompt_logprobs, metrics, completions = packed
    return RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(*c) for c in completions],
                         finished, prompt_logprobs, num_cached_tokens, metrics or {})


# ---- the engine process ----


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
        conn.send(("ready", EngineInfo(
            engine.config, engine.tokenizer, engine.max_model_len, engine.vocab_size, engine.eos_token_ids,
            engine.block_manager.num_pages, parts.generation_defaults, parts.chat_template)))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))
        return
    try:
        _engine_loop(engine, conn)
    except (EOFError, OSError):
        return  # the HTTP process is gone
    except BaseException:
        logger.exception("engine loop died")
        with contextlib.suppress(OSError):
            conn.send(("dead", traceback.format_exc()))
    finally:
        engine.shutdown()  # NOTE: or the exit waits for every bucket still queued to load


def _engine_loop(engine: LLMEngine, conn: Connection) -> None:
    last_command, last_stats = 0, 0.0
    while True:
        messages = []
        if not engine.has_unfinished_requests() or conn.poll():
            messages += conn.recv()  # a batch of commands; blocks while there is nothing to do
            while conn.poll():
                messages += conn.recv()
        rejected = []
        for kind, seq, *args in messages:
            if kind == "stop":
                return
            last_command = seq
            if kind == "add":
                request_id, prompt_token_ids, params, prompt, cache_salt = args
                try:
                    engine.add_request(request_id, prompt_token_ids, params, prompt, cache_salt, delta=True)
                except ValueError as e:
                    rejected.append((request_id, str(e)))
            elif kind == "abort":
                engine.abort_request(args[0])
        outputs = [pack_output(o) for o in engine.step()] if engine.has_unfinished_requests() else []
        busy, now = engine.has_unfinished_requests(), time.monotonic()
        stats = None
        if not busy or now - last_stats >= STATS_INTERVAL_S:
            stats = EngineStats(engine.metrics.snapshot(), engine.block_manager.num_free_pages, last_command, busy)
            last_stats = now
        if outputs or rejected or stats is not None:
            conn.send(("step", outputs, rejected, stats))


# ---- the HTTP process ----


@dataclass
class _Running:
    request_id: str  # the client's
    prompt_token_ids: list[int]
    prompt: str | None


class ProcessEngine:
    def __init__(self, factory: EngineFactory) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine_process, name="jaxllm-engine", daemon=True,
                                        args=(factory, child_conn, logging.getLogger().getEffectiveLevel()))
        self._process.start()
        child_conn.close()
        try:
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
        info: EngineInfo = message[1]
        self.config, self.tokenizer = info.config, info.tokenizer
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self.eos_token_ids = info.eos_token_ids
        self.num_pages = info.num_pages
        self.generation_defaults, self.chat_template = info.generation_defaults, info.chat_template
        self._streams = OpenStreams()
        # NOTE: the engine process knows each request by a fresh id, "<request id>#<n>": the client's
        # id can come back (X-Request-Id) while the outputs or the abort of its last use are in flight.
        self._running: dict[str, _Running] = {}  # by engine id
        self._engine_ids: dict[str, str] = {}  # request id -> engine id
        self._next_id = itertools.count()
        self._ids_lock = threading.Lock()  # the two maps change on the event loop and the reader thread
        self._send_lock = threading.Lock()
        self._seq = 0
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="jaxllm-engine-sender", daemon=True)
        self._sender.start()
        self._stats = EngineStats(EngineMetrics(), info.num_pages, 0, busy=False)
        self._stopping = False
        self._dead_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name="jaxllm-engine-reader", daemon=True)
        self._reader.start()

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead_error

    def start(self) -> None:
        """Nothing left to start: the engine process is up once the constructor returns."""

    def shutdown(self) -> None:
        self._stopping = True
        self._send("stop")
        self._outbox.put(None)
        self._sender.join(5)
        # NOTE: a dead engine may never have got the stop (its sender gone): no 30 s wait for it.
        self._stop_process(timeout_s=1 if self.is_dead else 30)
        self._reader.join(5)
        self._streams.fail_all(lambda: EngineDeadError("the engine was shut down"))

    def _stop_process(self, timeout_s: float = 5) -> None:
        """Wait for the child to exit (it exits on "stop" or when the pipe closes), killing it after `timeout_s`."""
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
                       prompt: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """DELTA outputs of one request; the last has finished=True. A request the engine refuses raises
        ValueError from the first `__anext__`; closing the iterator aborts the request."""
        stream = self._streams.open(request_id)
        engine_id = f"{request_id}#{next(self._next_id)}"
        prompt_token_ids = list(prompt_token_ids)
        with self._ids_lock:
            self._running[engine_id] = _Running(request_id, prompt_token_ids, prompt)
            self._engine_ids[request_id] = engine_id
        self._send("add", engine_id, prompt_token_ids, sampling_params, prompt, cache_salt)

        def abandon() -> None:
            self._streams.close(request_id)
            self._forget(engine_id)
            self._send("abort", engine_id)

        async with contextlib.aclosing(consume(stream, abandon)) as outputs:
            async for output in outputs:
                yield output

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a final output whose finish_reason is "abort"."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self._send("abort", engine_id)

    def metrics(self) -> EngineMetrics:
        return self._stats.metrics

    def num_free_pages(self) -> int:
        return self._stats.num_free_pages

    async def wait_idle(self, poll_s: float = 0.005) -> None:
        """Wait until no request is queued or running and the engine process has seen every command."""
        while not self.is_dead:
            stats = self._stats
            if not len(self._streams) and not stats.busy and stats.last_command == self._seq:
                return
            await asyncio.sleep(poll_s)

    def _send(self, kind: str, *args: Any) -> None:
        with self._send_lock:  # sequence numbers in queue order
            self._seq += 1
            self._outbox.put((kind, self._seq, *args))

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            batch = [message]
            with contextlib.suppress(queue.Empty):
                while (message := self._outbox.get_nowait()) is not None:
                    batch.append(message)
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
            packed, rejected, stats = body
            for engine_id, message in rejected:
                if (running := self._forget(engine_id)) is not None:
                    self._streams.reject(running.request_id, ValueError(message))
            outputs = []
            for item in packed:
                engine_id, finished = item[0], item[1]
                running = self._forget(engine_id) if finished else self._running.get(engine_id)
                if running is not None:  # else its consumer has gone
                    outputs.append(unpack_output(item, running.request_id, running.prompt_token_ids, running.prompt))
            self._streams.deliver(outputs)
            if stats is not None:
                self._stats = stats

    def _forget(self, engine_id: str) -> _Running | None:
        with self._ids_lock:
            running = self._running.pop(engine_id, None)
            if running is not None and self._engine_ids.get(running.request_id) == engine_id:
                del self._engine_ids[running.request_id]
            return running

    def _die(self, cause: BaseException) -> None:
        logger.error("%s", cause)
        self._dead_error = cause
        self._streams.fail_all(lambda: engine_dead_error(cause))
