"""`/metrics`: the engine's `EngineMetrics` through a prometheus_client registry, as vLLM 0.34.0's families.

Names, types, help texts, label sets and buckets are those of vLLM's PrometheusStatLogger
(vllm/v1/metrics/loggers.py), with the `jaxllm:` prefix, or exactly vLLM's (`vllm:`) under
`--metrics-names vllm` so existing vLLM dashboards work unchanged. The registry also holds the HTTP
process's process, platform and GC collectors, as vLLM's default registry does.

NOTE: the HTTP process owns the only registry, and a collector turns the latest engine snapshot into
metric families at each scrape. prometheus_client's multiprocess mode (one mmap file per process and
metric, written on every observation) is for several processes that each record; here one engine
process records into plain counters and already sends the HTTP process a snapshot at least every
0.1 s (`engine_process.REPORT_STATS_INTERVAL_S`), so every scrape sees one consistent snapshot and the
engine's step path never calls prometheus_client. A registry per app (not the global one) lets several
servers live in one process, as the tests' do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from jaxllm.engine.metrics import EngineMetrics, Histogram

LABEL_NAMES = ("model_name", "engine")
# vLLM's label values, each always exported (zero or not).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")  # jaxllm's hits are all "device"
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # jaxllm never sleeps: awake

# (name without prefix, help, EngineMetrics attribute), in vLLM's order and words.
_HISTOGRAMS = (
    ("request_prompt_tokens", "Number of prefill tokens processed.", "request_prompt_tokens"),
    ("request_generation_tokens", "Number of generation tokens processed.", "request_generation_tokens"),
    ("iteration_tokens_total", "Histogram of number of tokens per engine_step.", "iteration_tokens"),
    ("request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
     "request_max_num_generation_tokens"),
    ("request_params_n", "Histogram of the n request parameter.", "request_params_n"),
    ("request_params_max_tokens", "Histogram of the max_tokens request parameter.", "request_params_max_tokens"),
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", "time_to_first_token"),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "inter_token_latency"),
    ("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
     "request_time_per_output_token"),
    ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e_request_latency"),
    ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "request_queue_time"),
    ("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
     "request_inference_time"),
    ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", "request_prefill_time"),
    ("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", "request_decode_time"),
    ("request_num_preemptions", "Histogram of the number of times a request was preempted.",
     "request_num_preemptions"),
    ("request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached "
     "tokens).", "request_prefill_kv_computed_tokens"),
)


class EngineMetricsCollector(Collector):
    """vLLM's metric families from the snapshot `read_metrics()` returns at each scrape."""

    def __init__(self, read_metrics: Callable[[], EngineMetrics], model_name: str, prefix: str) -> None:
        self._read_metrics = read_metrics
        self._prefix = prefix
        self._labels = [model_name, "0"]
        self._bucket_bounds: dict[tuple[float, ...], list[str]] = {}  # buckets -> their `le` texts, +Inf last

    def collect(self) -> Iterator[Metric]:
        m = self._read_metrics()
        yield self._gauge("num_requests_running", "Number of requests in model execution batches.",
                          m.num_requests_running)
        yield self._gauge("num_requests_waiting", "Number of requests waiting to be processed.",
                          m.num_requests_waiting)
        yield self._labelled(GaugeMetricFamily, "num_requests_waiting_by_reason",
                             "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
                             "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV "
                             "transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
                             "reason", {"capacity": m.num_requests_waiting - m.num_requests_deferred,
                                        "deferred": m.num_requests_deferred})
        yield self._labelled(GaugeMetricFamily, "engine_sleep_state",
                             "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
                             "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
                             "sleep_state", dict.fromkeys(SLEEP_STATES, 0) | {"awake": 1})
        yield self._gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m.kv_cache_usage)
        yield self._counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                            m.prefix_cache_queries_total)
        yield self._counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            m.prefix_cache_hits_total)
        yield self._counter("external_prefix_cache_queries", "External prefix cache queries from KV connector "
                            "cross-instance cache sharing, in terms of number of queried tokens.", 0)
        yield self._counter("external_prefix_cache_hits", "External prefix cache hits from KV connector "
                            "cross-instance cache sharing, in terms of number of cached tokens.", 0)
        yield self._counter("mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.", 0)
        yield self._counter("mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", 0)
        yield self._counter("num_preemptions", "Cumulative number of preemption from the engine.",
                            m.num_preemptions_total)
        yield self._counter("prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens_total)
        computed = m.prompt_tokens_total - m.prompt_tokens_cached_total
        yield self._labelled(CounterMetricFamily, "prompt_tokens_by_source", "Number of prompt tokens by source.",
                             "source", {"local_compute": computed, "local_cache_hit": m.prompt_tokens_cached_total,
                                        "external_kv_transfer": 0})
        yield self._counter("prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                            m.prompt_tokens_cached_total)
        yield self._labelled(CounterMetricFamily, "prompt_tokens_cached_by_source",
                             "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host "
                             "(offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
                             "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
                             "vllm:external_prefix_cache_hits.",
                             "source", dict.fromkeys(CACHE_HIT_SOURCES, 0) | {"device": m.prefix_cache_hits_total})
        yield self._counter("generation_tokens", "Number of generation tokens processed.", m.generation_tokens_total)
        yield self._labelled(CounterMetricFamily, "request_success", "Count of successfully processed requests.",
                             "finished_reason", dict.fromkeys(FINISH_REASONS, 0) | m.request_success_total)
        for name, documentation, attribute in _HISTOGRAMS:
            yield self._histogram(name, documentation, getattr(m, attribute))

    def _gauge(self, name: str, documentation: str, value: float) -> Metric:
        family = GaugeMetricFamily(f"{self._prefix}:{name}", documentation, labels=LABEL_NAMES)
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, documentation: str, value: float) -> Metric:
        family = CounterMetricFamily(f"{self._prefix}:{name}", documentation, labels=LABEL_NAMES)
        family.add_metric(self._labels, value)
        return family

    def _labelled(self, family_type: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
                  documentation: str, label: str, values: dict[str, float]) -> Metric:
        family = family_type(f"{self._prefix}:{name}", documentation, labels=(*LABEL_NAMES, label))
        for label_value, value in values.items():
            family.add_metric([*self._labels, label_value], value)
        return family

    def _histogram(self, name: str, documentation: str, histogram: Histogram) -> Metric:
        bounds = self._bucket_bounds.get(histogram.buckets)
        if bounds is None:
            bounds = self._bucket_bounds[histogram.buckets] = [*map(floatToGoString, histogram.buckets), "+Inf"]
        family = HistogramMetricFamily(f"{self._prefix}:{name}", documentation, labels=LABEL_NAMES)
        family.add_metric(self._labels, list(zip(bounds, histogram.cumulative(), strict=True)), histogram.sum)
        return family


def metrics_registry(read_metrics: Callable[[], EngineMetrics], model_name: str, prefix: str) -> CollectorRegistry:
    """A registry of the engine's metrics (`prefix` "jaxllm" or "vllm") and this process's own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineMetricsCollector(read_metrics, model_name, prefix))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render_metrics(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition and its content type: Prometheus text 0.0.4, or OpenMetrics when `accept` asks for it."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
