"""Serving one model from several processes: process 0 replays its engine calls on the others.

    process 0: HTTP ─▶ AsyncEngine loop: take commands ─▶ engine calls (add / abort) ─▶ publish ─▶ step()
    process i:                     receive ─▶ the same engine calls ─▶ step() (outputs dropped)

Each message is what one iteration of process 0's engine loop did to its `LLMEngine` before stepping:
the `add_request` / `abort_request` calls it made, in order, and whether it then stepped. The engine
is deterministic given its calls (scheduler, block manager, the seeds it draws), so every process
builds the same `SchedulerOutput` and runs the same SPMD step. Only calls that reached the engine
are sent (a request cancelled before the engine saw it is not), and a call that raised on process 0
raises the same way, and is ignored, on the others.

No jax here: the transport (`jaxllm.distributed.StepPublisher` / `StepReceiver`) is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxllm.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class EngineCall:
    """One call on the `LLMEngine`: method name ("add_request" | "abort_request") and its arguments."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    raised: bool = False  # it raised ValueError (an invalid request) on process 0

    def apply(self, engine: LLMEngine) -> None:
        if self.method not in ("add_request", "abort_request"):
            raise ValueError(f"not an engine call: {self.method!r}")
        getattr(engine, self.method)(*self.args, **self.kwargs)


@dataclass(frozen=True)
class StepMessage:
    """One iteration of process 0's engine loop. stop: process 0's engine ended; the others return."""

    calls: list[EngineCall]
    step: bool
    stop: bool = False
    failed: bool = False  # with stop: process 0's engine died (the others exit with an error too)


Publish = Callable[[StepMessage], None]
Receive = Callable[[], StepMessage]


def follow(engine: LLMEngine, receive: Receive) -> int:
    """Replay process 0's engine loop on this process's engine until it stops; returns the steps run."""
    steps = 0
    while not (message := receive()).stop:
        for call in message.calls:
            try:
                call.apply(engine)
                raised = False
            except ValueError:  # an invalid request: process 0 told its client; nothing was changed
                raised = True
            if raised != call.raised:
                raise RuntimeError(f"this process's engine diverged from process 0's: {call.method} "
                                   f"{'raised' if raised else 'succeeded'} here only")
        if message.step:
            if not engine.has_unfinished_requests():
                raise RuntimeError("this process's engine diverged from process 0's: it has nothing to step")
            engine.step()
            steps += 1
    if message.failed:
        raise RuntimeError("process 0's engine died; this process stops with it")
    return steps
