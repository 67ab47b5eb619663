"""What the engine is doing right now, for the status page: its requests and the runner's compiled programs.

`LLMEngine.metrics_snapshot()` reads one `LiveStatus` into each metrics snapshot, so it reaches the HTTP
process with the counters; reading it costs a few microseconds per listed request.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from jaxllm.engine.request import Request

# Requests listed per queue (running, waiting): the oldest ones; the counts cover the rest.
MAX_LISTED_REQUESTS = 64


@dataclass(frozen=True, slots=True)
class LiveRequest:
    request_id: str  # the scheduler's: "{i}_{id}" for the i-th of n > 1 samples
    state: str  # "running", "waiting", "preempted" or "waiting_for_grammar"
    arrival_wall_time: float  # time.time() of its arrival
    prompt_tokens: int
    output_tokens: int  # sampled so far
    computed_tokens: int  # tokens whose KV is in its pages (prefill progress)


@dataclass(frozen=True, slots=True)
class CompileState:
    """The runner's step programs: each forward bucket and whether it has loaded yet."""

    forward_buckets: tuple[tuple[int, int, bool], ...] = ()  # (T tokens, P pages per request, loaded), by T
    samplers_loaded: int = 0  # sampler variants compiled (warm-up's and any compiled on first use)


@dataclass(frozen=True, slots=True)
class LiveStatus:
    running: tuple[LiveRequest, ...] = ()  # oldest first, at most MAX_LISTED_REQUESTS
    waiting: tuple[LiveRequest, ...] = ()  # in queue order, at most MAX_LISTED_REQUESTS
    compile: CompileState = CompileState()


def live_status(running: Iterable[Request], waiting: Iterable[Request], compile_state: CompileState) -> LiveStatus:
    """The status of the scheduler's queues (read from another thread too: each queue is copied in one C call)."""
    # NOTE: list(islice(...)) holds the GIL throughout, so a deque the engine thread mutates meanwhile
    # cannot raise "mutated during iteration".
    listed_running = list(itertools.islice(running, MAX_LISTED_REQUESTS))
    listed_waiting = list(itertools.islice(waiting, MAX_LISTED_REQUESTS))
    wall_offset = time.time() - time.monotonic()  # Request.arrival_time is monotonic
    return LiveStatus(tuple(_live(r, wall_offset) for r in listed_running),
                      tuple(_live(r, wall_offset) for r in listed_waiting), compile_state)


def _live(request: Request, wall_offset: float) -> LiveRequest:
    return LiveRequest(request.req_id, request.status.name.lower(), request.arrival_time + wall_offset,
                       len(request.prompt_token_ids), len(request.output_token_ids), request.num_computed_tokens)
