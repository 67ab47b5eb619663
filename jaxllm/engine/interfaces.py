"""The handoff between the scheduler (host) and the model runner (device), both directions.

The scheduler sends each request's full state once (`NewRequestData`, also when a preempted
request is resumed) and only diffs afterwards (`CachedRequestData`), as vLLM v1 does. The
runner keeps its own persistent per-request state (token history, page table row, sampling
params) keyed by request id and forgets a request when it appears in `finished_req_ids`.

No jax here: the engine and the scheduler are device-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from jaxllm.engine.live_status import CompileState
from jaxllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    page_ids: list[int]  # every KV page the request holds, in order
    num_computed_tokens: int  # tokens already in its pages (prefix-cache hits); computing starts here
    # Tokens generated before a preemption; they are recomputed like prompt tokens but are
    # outputs (penalties count them, prompt_logprobs does not).
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: what changed since it was last scheduled."""

    req_id: str
    new_page_ids: list[int]  # pages appended since the last step, in order
    num_computed_tokens: int  # tokens in the KV cache before this step


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # req_id -> query tokens to process this step (1 for a decode, up to the budget for a prefill chunk).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Finished, aborted or preempted since the last step: the runner drops their state, before
    # reading new_requests (a preempted request may be dropped and re-sent in the same step).
    # Ids the runner does not hold (aborted before their first step) may appear: ignore them.
    finished_req_ids: set[str] = field(default_factory=set)
    # Constrained requests (structured outputs) that sample this step. Their masks are not known at
    # schedule time: in async scheduling the previous step's token is still in flight.
    structured_req_ids: list[str] = field(default_factory=list)
    # req_id -> packed allowed-token bitmask [ceil(vocab / 32)] int32 of each structured_req_ids
    # entry still running, filled by the engine (Scheduler.grammar_bitmask) once the previous
    # step's tokens are accepted, while this step's forward runs; handed to StepHandle.sample.
    grammar_bitmask: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Logprobs at one sampled position (only for requests that asked for them)."""

    token_ids: list[int]  # the top-k ids, most likely first
    logprobs: list[float]  # their logprobs
    sampled_logprob: float
    sampled_rank: int  # 1 = most likely


@dataclass
class ModelRunnerOutput:
    # Requests whose step reached the end of their known tokens, so they sampled, in order.
    req_ids: list[str]
    sampled_token_ids: list[int]  # one per entry of req_ids
    # Per entry of req_ids: logprobs when the request asked (sampling_params.logprobs), else None.
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # req_id -> logprobs of the prompt tokens processed this step (prompt_logprobs requests),
    # one entry per processed token position p, describing token p + 1.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class StepHandle(Protocol):
    def sample(self, grammar_bitmask: dict[str, np.ndarray]) -> None:
        """Dispatch the sampling of a step with structured_req_ids (its forward is already running),
        masked by these bitmasks; the engine calls it once, before result() and the next execute()."""
        ...

    def result(self) -> ModelRunnerOutput:
        """Block until this step's sampled tokens are on the host."""
        ...


class ModelRunnerProtocol(Protocol):
    """What the engine needs of a runner (the real one, or the fake one in tests)."""

    def execute(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Dispatch one step. May return before the device finishes (async copy back). With
        structured_req_ids, only the forward: the sampling waits for StepHandle.sample.

        In async scheduling, a decode's input token may be the one sampled by the previous step,
        still on the device: the runner substitutes it itself.
        """
        ...

    def start_background_work(self) -> None:
        """Begin the work left for later (a served engine's buckets still to load); the engine's loop calls it
        as it starts, once the engine has been described to its clients."""
        ...

    def shutdown(self) -> None:
        """Stop any background work (buckets still loading). Steps may still run afterwards."""
        ...

    def compile_state(self) -> CompileState:
        """Which step programs have loaded so far (the status page's; called from any thread)."""
        ...
