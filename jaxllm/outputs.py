"""`RequestOutput` and `CompletionOutput`, shaped as vLLM's, and `EngineOutput`, the engine's per-step form.

The engine emits one `EngineOutput` per request with news each step. It is made of tuples, so it
crosses the process boundary as it is (the engine process pickles a step's outputs in one send);
the client that submitted the request turns it into the `RequestOutput` its caller reads, adding
the prompt it kept (`EngineOutput.to_request_output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely (a logprob_token_ids entry: its place in that list, as vLLM's)
    decoded_token: str | None = None


# One dict per position: token id -> Logprob, the chosen token first, then the top-k (most likely first; the
# whole vocabulary for logprobs=-1) or, instead, each of the request's logprob_token_ids in its order.
SampleLogprobs = list[dict[int, Logprob]]
# As SampleLogprobs, with None for the first prompt token (it has no logprob).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Why the request failed (its outputs' finish_reason is "error"), e.g. a grammar that did not compile.
    error: str | None = None


class SequenceOutput(NamedTuple):
    """One sequence's part of an `EngineOutput`: `CompletionOutput`'s fields, in its order."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class EngineOutput(NamedTuple):
    """What the engine reports of one request in one step (all of it, or what is new: the request's
    `output_kind`)."""

    request_id: str
    sequences: list[SequenceOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    metrics: dict[str, float] | None = None  # with the finished output only
    error: str | None = None  # the request failed; it is finished

    def to_request_output(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> RequestOutput:
        """The caller's `RequestOutput` (under its own request id), with the prompt the client kept."""
        return RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(*s) for s in self.sequences],
                             self.finished, self.prompt_logprobs, self.num_cached_tokens, self.metrics or {},
                             self.error)


def merge_delta(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of one request as one (as vLLM's output collector merges them
    when the consumer has fallen behind): text, token ids and logprobs concatenated per sequence,
    everything else from the later one. `earlier` is updated in place and returned."""
    by_index = {c.index: c for c in earlier.outputs}
    for new in later.outputs:
        old = by_index.get(new.index)
        if old is None:
            earlier.outputs.append(new)
            by_index[new.index] = new
            continue
        old.text += new.text
        old.token_ids = old.token_ids + new.token_ids
        if old.logprobs is not None or new.logprobs is not None:
            old.logprobs = (old.logprobs or []) + (new.logprobs or [])
        old.cumulative_logprob = new.cumulative_logprob
        old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
    earlier.outputs.sort(key=lambda c: c.index)
    if earlier.prompt_logprobs is None:
        earlier.prompt_logprobs = later.prompt_logprobs
    earlier.finished = later.finished
    earlier.num_cached_tokens = later.num_cached_tokens
    earlier.metrics = later.metrics
    earlier.error = later.error
    return earlier
