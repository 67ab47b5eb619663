"""Prompt rendering and tokenizing off the event loop: a small pool of worker processes, each holding a copy
of the tokenizer.

Jinja and the Python side of `transformers` hold the GIL, so a thread would still stall the event loop that
answers /health and writes every stream's chunks; a worker process does not. Small jobs (a few thousand
characters: a millisecond or so) run inline, which costs less than the trip to a worker and never starts one.
The server starts the pool before it listens (`start`); elsewhere (the in-process test servers) it starts,
on a thread, for the first large job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, TypeVar

from serve.prompt_length import max_chars_per_token

logger = logging.getLogger("jaxllm.serve")

ResultT = TypeVar("ResultT")

# Jobs lighter than this run on the event loop: 7-14 ms of tokenizing (Llama 2's, 3's and Qwen2.5's tokenizers)
# on the shared 2-core CPU.
INLINE_WEIGHT = 16 * 1024

_WORKER_NICENESS = 10
_worker_tokenizer: Any = None  # the tokenizer, in a worker process


class RenderPool:
    """Runs `job(tokenizer, *args, **kwargs)` (`serve.prompt_jobs`): inline when `weight` (about the characters
    of text) is small, else in one of `processes` worker processes (0: always inline). Knows the tokenizer's
    `max_chars_per_token` (`serve.prompt_length`), for the length checks before a job."""

    def __init__(self, tokenizer: Any, processes: int) -> None:
        self.tokenizer = tokenizer
        self.processes = processes
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        self._context = _TrackedSpawnContext()
        self._executor: ProcessPoolExecutor | None = None
        self._starting = threading.Lock()

    async def run(self, job: Callable[..., ResultT], *args: Any, weight: int, **kwargs: Any) -> ResultT:
        if weight < INLINE_WEIGHT or self.processes == 0:
            return job(self.tokenizer, *args, **kwargs)
        # NOTE: starting blocks until each worker has read the pickled tokenizer (seconds): never on the loop.
        executor = self._executor or await asyncio.to_thread(self.start)
        if executor is None:  # the workers could not start
            return job(self.tokenizer, *args, **kwargs)
        try:
            return await asyncio.wrap_future(executor.submit(_run_job, job, args, kwargs))
        except BrokenProcessPool:
            # NOTE: a worker died (killed for memory, say); the next large job starts a fresh pool.
            if self._executor is executor:
                self._executor = None
            raise RuntimeError("a prompt-rendering worker process died") from None

    def start_in_background(self) -> None:
        """Start the workers on a thread: the server listens meanwhile, and a large job that comes first waits
        for them (`run`). NOTE: not before listening, as the start is seconds (pickling and unpickling the
        tokenizer, the workers' imports) that a served start-up would add to its first answer."""
        threading.Thread(target=self.start, name="jaxllm-render-pool-start", daemon=True).start()

    def start(self) -> ProcessPoolExecutor | None:
        """The pool, its workers started (blocking: about 1 s, or 3 s with Llama 3's tokenizer on a busy 2-core
        CPU); None with no workers."""
        with self._starting:
            if self._executor is None and self.processes > 0:
                logger.info("Starting %d prompt-rendering worker process(es).", self.processes)
                try:
                    self._executor = self._started_executor()
                except Exception:
                    # NOTE: whatever keeps the workers from starting (a tokenizer that does not pickle, no
                    # processes left), the server still serves: rendering on the event loop, as it did before.
                    logger.exception("The prompt-rendering workers could not start; rendering on the event loop.")
                    self._close()
                    self.processes = 0
            return self._executor

    def _started_executor(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(self.processes, mp_context=self._context, initializer=_install_tokenizer,
                                       initargs=(pickle.dumps(self.tokenizer),))
        # each submit while no worker is idle starts one
        for warm_up in [executor.submit(_run_job, _warm_up, (), {}) for _ in range(self.processes)]:
            warm_up.result()
        return executor

    def close(self) -> None:
        """Stop the workers now, a job in progress included (at exit, Python would wait for it); a start in
        progress first finishes, so that none of its workers outlives the pool."""
        with self._starting:
            self._close()

    def _close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for process in list(self._context.processes):
            process.terminate()


class _TrackedSpawnContext(SpawnContext):
    """The spawn context (the HTTP process has threads: no fork), remembering its processes so that `close`
    can stop them."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: weakref.WeakSet[SpawnProcess] = weakref.WeakSet()

    def Process(self, *args: Any, **kwargs: Any) -> SpawnProcess:  # noqa: N802 (multiprocessing's name)
        process = SpawnProcess(*args, **kwargs)
        self.processes.add(process)
        return process


def _install_tokenizer(pickled: bytes) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the server stops the pool
    # NOTE: a worker's jobs can run for seconds at full speed; below the event loop's and the engine's
    # priority they take only the CPU those leave (on a 2-core machine, /health waited 0.3 s behind them).
    os.nice(_WORKER_NICENESS)
    _worker_tokenizer = pickle.loads(pickled)


def _warm_up(tokenizer: Any) -> None:
    tokenizer.encode("warm up")


def _run_job(job: Callable[..., ResultT], args: tuple[Any, ...], kwargs: dict[str, Any]) -> ResultT:
    return job(_worker_tokenizer, *args, **kwargs)

