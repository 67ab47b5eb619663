"""The engine core: typed commands in, one loop that applies them and steps the engine, per-step outputs out.

    AddRequest / Abort ─▶ source ─▶ EngineCore.run():  take the commands (waiting while there is no work)
                                                        apply them to the LLMEngine
                                                        [process 0] grammar compiles that ended ─▶ GrammarReady
                                                        [process 0 of several] publish the iteration
                                                        step ─▶ sink(list[EngineOutput])

Every engine loop is this one, with its own source and sink:
- `AsyncEngine` runs it on a thread of the HTTP process (`jaxllm.engine.async_engine`);
- the engine process runs it in its main thread, fed by a pipe (`jaxllm.engine.engine_process`);
- processes 1..N-1 of a multi-process server replay process 0's iterations (`ReplaySource`, `follow`);
- the offline `LLM` feeds it one batch and runs it until that batch is done (`until_idle`).

NOTE: a request with structured outputs waits outside the scheduler while its grammar compiles on a
thread pool (`GrammarCompiles`), so a big schema never stalls the other requests' steps. When a compile
ends is a fact of one process's threads, so only the leader (process 0) decides it, as a `GrammarReady`
command applied and replicated like any other: every process then lets that request in at the same step
(a follower waits for its own compile of the same grammar there).

No jax here: the transport between processes (`jaxllm.distributed`) is injected as `publish` / `receive`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from jaxllm.config import EngineConfig, EngineLimits
from jaxllm.outputs import EngineOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import tokenize_bad_words, validate_request

if TYPE_CHECKING:
    from jaxllm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

GRAMMAR_WORKERS = 2


# ---- commands ----


@dataclass(frozen=True, slots=True)
class AddRequest:
    """A validated request (`EngineInfo.new_request`): the engine trusts it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved by validation: params.max_tokens, or the rest of the context
    prompt: str | None = None
    cache_salt: str | None = None
    # Whose turn its sequences take to enter the scheduler (`jaxllm.engine.admission`): the prompts of one
    # user request share one; None: its own.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    """Abort requests (unknown or finished ids are ignored); each reports a final output, finish_reason "abort"."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GrammarReady:
    """Process 0's decision that a request's grammar compile has ended; `error`: it failed, and so does the request."""

    request_id: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Shutdown:
    """End the loop. failed: process 0's loop died (its followers stop with an error too)."""

    failed: bool = False


EngineCommand = AddRequest | Abort | GrammarReady | Shutdown


@dataclass(frozen=True, slots=True)
class Iteration:
    """What one turn of the loop takes in. A follower's also says whether process 0 stepped after them."""

    commands: list[EngineCommand]
    step: bool | None = None


Sink = Callable[[list[EngineOutput]], None]
Publish = Callable[[Iteration], None]


class CommandSource(Protocol):
    def receive(self, block: bool) -> Iteration:
        """The commands since the last call; with `block`, wait for one (or for `wake`) first."""
        ...

    def wake(self) -> None:
        """End a blocked `receive` (a grammar compile ended)."""
        ...

    def has_pending(self) -> bool: ...


class CommandQueue:
    """Commands from any thread to the loop's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: list[EngineCommand] = []
        self._event = threading.Event()

    def put(self, *commands: EngineCommand) -> None:
        with self._lock:
            self._commands.extend(commands)
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._commands)

    def receive(self, block: bool) -> Iteration:
        if block:
            self._event.wait()
        # NOTE: cleared before the commands are taken: one put in between is taken now, one after sets it again.
        self._event.clear()
        with self._lock:
            commands, self._commands = self._commands, []
        return Iteration(commands)


class ReplaySource:
    """A follower's source: process 0's published iterations, in order (`receive` blocks on the transport)."""

    def __init__(self, receive: Callable[[], Iteration]) -> None:
        self._receive = receive

    def receive(self, block: bool) -> Iteration:
        return self._receive()

    def wake(self) -> None:
        pass  # a follower decides nothing by itself

    def has_pending(self) -> bool:
        return False


# ---- what clients know of an engine ----


@dataclass(frozen=True)
class EngineInfo:
    """The one declared description of an engine, for its clients: the engine process sends it once built."""

    config: EngineConfig
    limits: EngineLimits
    vocab_size: int
    eos_token_ids: frozenset[int]
    tokenizer: Any  # the transformers tokenizer (prompts, chat templates, logprob tokens)
    default_sampling: dict[str, Any]  # SamplingParams fields from the model's generation config
    chat_template: str | None  # --chat-template resolved to text; None: the tokenizer's own
    structured_outputs: bool  # whether the engine has a grammar backend
    model_type: str | None = None  # config.json's `model_type` ("gpt_oss" turns on harmony chat); None: unknown

    @classmethod
    def describe(cls, engine: LLMEngine, default_sampling: dict[str, Any] | None = None,
                 chat_template: str | None = None, model_type: str | None = None) -> EngineInfo:
        return cls(engine.config, engine.limits, engine.vocab_size, engine.eos_token_ids, engine.tokenizer,
                   dict(default_sampling or {}), chat_template, engine.grammar_compiler is not None, model_type)

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def served_model_names(self) -> list[str]:
        return self.config.model.served_names

    def new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    prompt: str | None = None, cache_salt: str | None = None,
                    default_max_tokens: int | None = None) -> AddRequest:
        """The command for a request, validated (`jaxllm.validation.ValidationError` if it cannot be served)."""
        max_tokens = validate_request(prompt_token_ids, params, self.limits, self.vocab_size,
                                      max_logprobs=self.config.model.max_logprobs,
                                      structured_outputs=self.structured_outputs,
                                      default_max_tokens=default_max_tokens)
        # NOTE: on a copy: the caller's params may serve other prompts (LLM.generate) and stay as given.
        params = params.clone(bad_words_token_ids=tokenize_bad_words(params.bad_words, self.tokenizer, self.vocab_size)
                              if params.bad_words else None)
        return AddRequest(request_id, list(prompt_token_ids), params, max_tokens, prompt, cache_salt)


# ---- grammar compiles off the loop ----


class GrammarCompiles:
    """Grammar compiles on a small thread pool (llguidance releases the GIL), by request id."""

    def __init__(self, workers: int = GRAMMAR_WORKERS) -> None:
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}  # in submission order
        self.on_done: Callable[[], None] = lambda: None

    @property
    def pending(self) -> bool:
        return bool(self._futures)

    def submit(self, request_id: str, compile_fn: Callable[[], Any]) -> None:
        future = self._futures[request_id] = self._executor().submit(compile_fn)
        future.add_done_callback(lambda _: self.on_done())

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="jaxllm-grammar")
        return self._pool

    def cancel(self, request_id: str) -> None:
        future = self._futures.pop(request_id, None)
        if future is not None:
            future.cancel()

    def ended(self) -> list[GrammarReady]:
        """A decision for each compile that has ended (the leader's), oldest first."""
        return [self.wait(request_id) for request_id, future in self._futures.items() if future.done()]

    def wait(self, request_id: str) -> GrammarReady:
        """The decision on the request's compile, once it has ended."""
        return GrammarReady(request_id, _compile_error(self._futures[request_id].exception()))

    def take(self, request_id: str) -> Any:
        """The compiled grammar (waits for it: a follower's compile may still run); raises its error."""
        return self._futures.pop(request_id).result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _compile_error(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, ValueError):  # the grammar backend's message names the construct
        return str(exc)
    logger.error("A grammar compile failed: %r", exc)
    return "The request's structured output constraint could not be compiled."


# ---- the loop ----


class EngineCore:
    """One `LLMEngine` driven by commands. leader=False: a follower of process 0 (it replays, decides nothing);
    `publish`: process 0's, to send each iteration to its followers.

    wait_for_grammars: decide each grammar as soon as its request is added, waiting for the compile; for
    processes that run the same requests with no channel between them (the offline `LLM` on several
    processes), where only this keeps them in step."""

    def __init__(self, engine: LLMEngine, *, leader: bool = True, publish: Publish | None = None,
                 wait_for_grammars: bool = False) -> None:
        self.engine = engine
        self._leader = leader
        self._publish = publish
        self._wait_for_grammars = wait_for_grammars
        self._grammars = GrammarCompiles()

    def close(self) -> None:
        """Stop the grammar compiles and the runner's background work."""
        self._grammars.shutdown()
        self.engine.shutdown()

    def run(self, source: CommandSource, sink: Sink, *, until_idle: bool = False) -> int:
        """Apply commands and step until a `Shutdown` (or, `until_idle`, until nothing is left to do).
        Returns the number of steps run. An exception ends the loop: the engine is dead."""
        self._grammars.on_done = source.wake
        self.engine.start_background_work()
        steps, failed = 0, True
        try:
            while True:
                idle = not self.engine.needs_step()
                if idle and until_idle and not self._grammars.pending and not source.has_pending():
                    failed = False
                    return steps
                iteration = source.receive(block=idle)
                commands = list(iteration.commands)
                if self._leader:
                    commands += self._grammars.ended()
                applied = []
                for command in commands:
                    if isinstance(command, Shutdown):
                        if command.failed:
                            raise RuntimeError("process 0's engine died; this process stops with it")
                        failed = False
                        return steps
                    self._apply(command)
                    applied.append(command)
                step = self.engine.needs_step()
                if iteration.step is not None and iteration.step != step:
                    raise RuntimeError(f"this process's engine diverged from process 0's: process 0 "
                                       f"{'stepped' if iteration.step else 'did not step'}, this one would "
                                       f"{'' if step else 'not '}step")
                if self._publish is not None and (applied or step):
                    self._publish(Iteration(applied, step))
                outputs = self.engine.step() if step else []
                steps += step
                sink(outputs)
        finally:
            if self._publish is not None:
                try:
                    self._publish(Iteration([Shutdown(failed)], False))
                except Exception:  # the other processes then fail on their own (runtime timeouts)
                    logger.exception("could not tell the other processes to stop")

    def _apply(self, command: EngineCommand) -> None:
        engine = self.engine
        if isinstance(command, AddRequest):
            engine.add_request(command)
            if command.params.structured_outputs is not None:
                params = command.params
                self._grammars.submit(command.request_id, lambda: engine.compile_grammar(params))
                if self._wait_for_grammars:
                    self._apply(self._grammars.wait(command.request_id))
        elif isinstance(command, Abort):
            engine.abort_request(command.request_ids)
            for request_id in command.request_ids:
                self._grammars.cancel(request_id)
        elif isinstance(command, GrammarReady):
            if not engine.is_waiting_for_grammar(command.request_id):
                self._grammars.cancel(command.request_id)  # aborted meanwhile
            elif command.error is not None:
                self._grammars.cancel(command.request_id)
                engine.fail_request(command.request_id, command.error)
            else:
                try:
                    grammar = self._grammars.take(command.request_id)
                except Exception as e:
                    raise RuntimeError(f"this process's grammar compile of {command.request_id!r} failed where "
                                       f"process 0's did not: {e!r}") from e
                engine.grammar_ready(command.request_id, grammar)
        else:
            raise TypeError(f"not an engine command: {command!r}")


def follow(engine: LLMEngine, receive: Callable[[], Iteration]) -> int:
    """Processes 1..N-1: replay process 0's loop on this process's engine until it stops; returns the steps run."""
    core = EngineCore(engine, leader=False)
    try:
        return core.run(ReplaySource(receive), lambda outputs: None)
    finally:
        core.close()
