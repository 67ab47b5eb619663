"""What the engine is doing right now, for the status page: its requests and the runner's compiled programs.

`LLMEngine.metrics_snapshot()` puts one `LiveStatus` into each metrics snapshot, so it reaches the HTTP
process with the counters; it reads a new one at most every LIVE_STATUS_INTERVAL_S.
"""

from __future__ import annotations

from dataclasses import dataclass

# User requests listed: the oldest ones; LiveStatus.num_requests counts them all.
MAX_LISTED_REQUESTS = 64
# How often the listing is read again (the status page polls once a second); an engine with no requests
# left reads it at once, so an idle engine's last snapshot lists none.
LIVE_STATUS_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class LiveRequest:
    """One user request: its n sequences, as far as they have gone."""

    request_id: str
    state: str  # "running" (a sequence of it runs), "waiting" or "waiting_for_grammar"
    arrival_wall_time: float  # time.time() of its arrival
    prompt_tokens: int
    n: int
    num_unfinished: int  # of its n sequences, those not let into the scheduler yet included
    output_tokens: int  # sampled so far, over its sequences
    prefilled_tokens: int  # prompt tokens in the KV pages of its furthest sequence


@dataclass(frozen=True, slots=True)
class CompileState:
    """The runner's step programs: each forward bucket and whether it has loaded yet."""

    forward_buckets: tuple[tuple[int, int, bool], ...] = ()  # (T tokens, P pages per request, loaded), by T
    samplers_loaded: int = 0  # sampler variants compiled (warm-up's and any compiled on first use)


@dataclass(frozen=True, slots=True)
class LiveStatus:
    requests: tuple[LiveRequest, ...] = ()  # the oldest user requests, at most MAX_LISTED_REQUESTS
    num_requests: int = 0  # user requests not finished
    compile: CompileState = CompileState()
