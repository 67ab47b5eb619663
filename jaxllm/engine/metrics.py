"""Engine statistics with vLLM's meanings; `serve/` renders them as Prometheus text.

The engine's thread records into one `EngineMetrics` through its methods; readers on other threads
take `snapshot()` copies (the engine process sends those to the HTTP process). No prometheus-client:
the counters and histograms are plain data.
"""

from __future__ import annotations

import bisect
import copy
import threading
from dataclasses import dataclass, field

# Bucket upper bounds (seconds), as vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]  # ascending upper bounds; +Inf is implicit
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), len(buckets) + 1
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


@dataclass
class EngineMetrics:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV pages in use, 0..1
    prompt_tokens_total: int = 0  # prompt tokens computed (cache hits excluded, as vLLM)
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of which found there
    num_free_pages: int = 0  # KV pages neither in use nor cached
    request_success_total: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e_request_latency: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def first_token(self, time_to_first_token: float, computed_prompt_tokens: int) -> None:
        """A request's first output token; its prompt tokens that were computed (prefix-cache hits are not)."""
        with self._lock:
            self.time_to_first_token.observe(time_to_first_token)
            self.prompt_tokens_total += computed_prompt_tokens
            self.generation_tokens_total += 1

    def next_token(self, inter_token_latency: float) -> None:
        with self._lock:
            self.inter_token_latency.observe(inter_token_latency)
            self.generation_tokens_total += 1

    def request_finished(self, finish_reason: str, e2e_latency: float) -> None:
        with self._lock:
            self.request_success_total[finish_reason] = self.request_success_total.get(finish_reason, 0) + 1
            self.e2e_request_latency.observe(e2e_latency)

    def set_gauges(self, *, running: int, waiting: int, kv_cache_usage: float, num_free_pages: int, preemptions: int,
                   prefix_cache_queries: int, prefix_cache_hits: int) -> None:
        with self._lock:
            self.num_requests_running, self.num_requests_waiting = running, waiting
            self.kv_cache_usage, self.num_free_pages = kv_cache_usage, num_free_pages
            self.num_preemptions_total = preemptions
            self.prefix_cache_queries_total, self.prefix_cache_hits_total = prefix_cache_queries, prefix_cache_hits

    def snapshot(self) -> EngineMetrics:
        with self._lock:
            out = copy.copy(self)
            out.request_success_total = dict(self.request_success_total)
            for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
                h = getattr(self, name)
                setattr(out, name, Histogram(h.buckets, list(h.counts), h.sum, h.count))
            out._lock = threading.Lock()
            return out

    def __getstate__(self) -> dict:
        """Picklable (the engine process sends snapshots to the HTTP process): the lock stays behind."""
        return {name: value for name, value in self.__dict__.items() if name != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
