"""Engine statistics with vLLM 0.34.0's meanings; `serve/prometheus_metrics.py` exposes them.

The engine's thread records into one `EngineMetrics` through its methods; readers on other threads
take `snapshot()` copies (the engine process sends those to the HTTP process, whose prometheus_client
registry reads the latest one at each scrape). The counters and histograms here are plain data, so
the step path never calls prometheus_client.

NOTE: `next_token` runs once per sampled token (256 times a step for 256 decodes), so it only appends
to a list that the engine's thread folds into the histogram, under the lock, once a step (`set_gauges`):
a snapshot taken meanwhile sees the counters as of the last step's end.
"""

from __future__ import annotations

import bisect
import copy
import threading
from dataclasses import dataclass, field, fields

from jaxllm.engine.live_status import LiveStatus
from jaxllm.engine.request import Request

# Bucket upper bounds, as vLLM's (vllm/v1/metrics/buckets.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)



def request_tokens_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


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

    def observe_all(self, values: list[float]) -> None:
        counts, buckets = self.counts, self.buckets
        for value in values:
            counts[bisect.bisect_left(buckets, value)] += 1
        self.sum += sum(values)
        self.count += len(values)

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


@dataclass(frozen=True)
class FinishedRequest:
    """One finished sequence's phases (seconds) and sizes, as vLLM's FinishedRequestStats.

    A phase the request never left ends when the request did (an abort while queued spent all its
    time in the queue), and one it never reached lasts 0."""

    e2e_latency: float
    queue_time: float  # arrival to first schedule
    prefill_time: float  # first schedule to first token
    decode_time: float  # first to last token
    inference_time: float  # first schedule to last token
    num_prompt_tokens: int
    num_cached_tokens: int  # prefix-cache hits at the first schedule
    num_generation_tokens: int
    max_tokens: int
    num_preemptions: int

    @classmethod
    def of(cls, request: Request, now: float) -> FinishedRequest:
        scheduled = now if request.first_scheduled_time is None else request.first_scheduled_time
        first_token = now if request.first_token_time is None else request.first_token_time
        last_token = first_token if request.last_token_time is None else request.last_token_time
        return cls(
            e2e_latency=now - request.arrival_time, queue_time=scheduled - request.arrival_time,
            prefill_time=first_token - scheduled, decode_time=last_token - first_token,
            inference_time=last_token - scheduled,
            num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=max(request.num_cached_tokens, 0),
            num_generation_tokens=len(request.output_token_ids), max_tokens=request.max_tokens,
            num_preemptions=request.num_preemptions)

    @property
    def time_per_output_token(self) -> float:
        """Decode time per token after the first (vLLM's mean_time_per_output_token); 0 for one token."""
        return self.decode_time / (self.num_generation_tokens - 1) if self.num_generation_tokens > 1 else 0.0


@dataclass
class EngineMetrics:
    max_model_len: int  # caps the token-count histograms' buckets, as vLLM's
    num_requests_running: int = 0
    num_requests_waiting: int = 0  # every sequence not running: queued, not let in yet, or awaiting its grammar
    num_requests_deferred: int = 0  # of which awaiting their grammar (vLLM's reason "deferred")
    kv_cache_usage: float = 0.0  # fraction of KV pages in use, 0..1
    prompt_tokens_total: int = 0  # prompt tokens of requests past their prefill, cache hits included (vLLM 0.34)
    prompt_tokens_cached_total: int = 0  # of which found in the prefix cache
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of which found there
    num_free_pages: int = 0  # KV pages neither in use nor cached
    request_success_total: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    time_to_first_token: Histogram = field(init=False)
    inter_token_latency: Histogram = field(init=False)
    e2e_request_latency: Histogram = field(init=False)
    request_queue_time: Histogram = field(init=False)
    request_inference_time: Histogram = field(init=False)
    request_prefill_time: Histogram = field(init=False)
    request_decode_time: Histogram = field(init=False)
    request_time_per_output_token: Histogram = field(init=False)
    request_prompt_tokens: Histogram = field(init=False)
    request_generation_tokens: Histogram = field(init=False)
    request_prefill_kv_computed_tokens: Histogram = field(init=False)
    request_max_num_generation_tokens: Histogram = field(init=False)  # per user request: its longest sequence
    request_params_n: Histogram = field(init=False)  # per user request
    request_params_max_tokens: Histogram = field(init=False)
    request_num_preemptions: Histogram = field(init=False)
    iteration_tokens: Histogram = field(init=False)  # tokens scheduled per engine step
    live: LiveStatus = LiveStatus()  # set on snapshots only (LLMEngine.metrics_snapshot), for the status page
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # This step's inter-token latencies, not yet in the histogram (the engine's thread alone touches it).
    _step_inter_token_latencies: list[float] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        token_buckets = request_tokens_buckets(self.max_model_len)
        buckets = {
            "time_to_first_token": TTFT_BUCKETS, "inter_token_latency": ITL_BUCKETS,
            "request_time_per_output_token": ITL_BUCKETS, "request_params_n": REQUEST_PARAMS_N_BUCKETS,
            "request_num_preemptions": REQUEST_NUM_PREEMPTIONS_BUCKETS, "iteration_tokens": ITERATION_TOKENS_BUCKETS,
        } | dict.fromkeys(("e2e_request_latency", "request_queue_time", "request_inference_time",
                           "request_prefill_time", "request_decode_time"), REQUEST_LATENCY_BUCKETS)
        for name in HISTOGRAM_FIELDS:
            setattr(self, name, Histogram(buckets.get(name, token_buckets)))

    def first_token(self, time_to_first_token: float, prompt_tokens: int, cached_prompt_tokens: int) -> None:
        """A request's first output token, after a prefill of `prompt_tokens`, `cached_prompt_tokens` of them hits."""
        with self._lock:
            self.time_to_first_token.observe(time_to_first_token)
            self.prompt_tokens_total += prompt_tokens
            self.prompt_tokens_cached_total += cached_prompt_tokens
            self.generation_tokens_total += 1

    def next_token(self, inter_token_latency: float) -> None:
        """A later output token (engine thread only): counted at the step's end (`set_gauges`)."""
        self._step_inter_token_latencies.append(inter_token_latency)

    def step_scheduled(self, num_tokens: int) -> None:
        with self._lock:
            self.iteration_tokens.observe(num_tokens)

    def request_finished(self, finish_reason: str, finished: FinishedRequest) -> None:
        with self._lock:
            self.request_success_total[finish_reason] = self.request_success_total.get(finish_reason, 0) + 1
            self.e2e_request_latency.observe(finished.e2e_latency)
            self.request_queue_time.observe(finished.queue_time)
            self.request_prefill_time.observe(finished.prefill_time)
            self.request_decode_time.observe(finished.decode_time)
            self.request_inference_time.observe(finished.inference_time)
            self.request_time_per_output_token.observe(finished.time_per_output_token)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_generation_tokens)
            self.request_prefill_kv_computed_tokens.observe(finished.num_prompt_tokens - finished.num_cached_tokens)
            self.request_params_max_tokens.observe(finished.max_tokens)
            self.request_num_preemptions.observe(finished.num_preemptions)

    def user_request_finished(self, n: int, max_generation_tokens: int) -> None:
        """A user request (all its `n` sequences) finished; its longest sequence has `max_generation_tokens`."""
        with self._lock:
            self.request_params_n.observe(n)
            self.request_max_num_generation_tokens.observe(max_generation_tokens)

    def set_gauges(self, *, running: int, waiting: int, deferred: int, kv_cache_usage: float, num_free_pages: int,
                   preemptions: int, prefix_cache_queries: int, prefix_cache_hits: int) -> None:
        """At each step's end, on the engine's thread: the gauges, and the step's later tokens counted."""
        latencies, self._step_inter_token_latencies = self._step_inter_token_latencies, []
        with self._lock:
            self.inter_token_latency.observe_all(latencies)
            self.generation_tokens_total += len(latencies)
            self.num_requests_running, self.num_requests_waiting = running, waiting
            self.num_requests_deferred = deferred
            self.kv_cache_usage, self.num_free_pages = kv_cache_usage, num_free_pages
            self.num_preemptions_total = preemptions
            self.prefix_cache_queries_total, self.prefix_cache_hits_total = prefix_cache_queries, prefix_cache_hits

    def snapshot(self) -> EngineMetrics:
        with self._lock:
            out = copy.copy(self)
            out.request_success_total = dict(self.request_success_total)
            for name in HISTOGRAM_FIELDS:
                setattr(out, name, getattr(self, name).copy())
            out._lock, out._step_inter_token_latencies = threading.Lock(), []
            return out

    def __getstate__(self) -> dict:
        """Picklable (the engine process sends snapshots to the HTTP process): the lock stays behind."""
        return {name: value for name, value in self.__dict__.items()
                if name not in ("_lock", "_step_inter_token_latencies")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._step_inter_token_latencies = threading.Lock(), []


# Every histogram of `EngineMetrics`, by attribute (its Histogram fields, in declaration order).
HISTOGRAM_FIELDS = tuple(f.name for f in fields(EngineMetrics) if f.type == "Histogram")
