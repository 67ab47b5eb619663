"""One request's host-side state, as counters rather than phases.

NOTE: prefill, chunked prefill, decode, a prefix-cache hit and recompute after a preemption are
all the same thing here: `num_computed_tokens` catching up to `num_tokens` (plus, in async
scheduling, the output placeholders whose tokens are still on the device).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


class Grammar(Protocol):
    """The structured-outputs seam: a matcher that follows a request's sampled tokens."""

    def accept_token(self, token_id: int) -> bool:
        """Advance the matcher by one sampled token (False: the grammar forbids it)."""
        ...

    def fill_bitmask(self, bitmask: np.ndarray) -> None:
        """Write the tokens allowed next into bitmask [ceil(vocab / 32)] int32 (bit t % 32 of word t // 32)."""
        ...


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: sampling_params.max_tokens, or the rest of the context
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None
    grammar: Grammar | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in (or being written to) the request's pages
    # Async scheduling: steps dispatched that will sample a token not yet on the host.
    num_output_placeholders: int = 0
    page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1  # prefix-cache hit tokens at the first schedule; -1 until then
    # Prefix cache bookkeeping (block_manager.py): hashes of full known blocks, and how many
    # of the request's pages are registered in the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_pages: int = 0
    # Timestamps (time.monotonic) for metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus sampled outputs on the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
