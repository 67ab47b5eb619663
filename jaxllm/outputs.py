"""`RequestOutput` and `CompletionOutput`, shaped as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the top-k plus the chosen token).
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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
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
    return earlier
