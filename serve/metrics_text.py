"""`/metrics`: `EngineMetrics` as Prometheus text (exposition format 0.0.4), with vLLM's metric meanings.

Names are vLLM's with the `jaxllm:` prefix, or exactly vLLM's (`vllm:`) with `--metrics-names vllm`
so existing vLLM dashboards work unchanged. Labels are vLLM's: `model_name` and `engine`.
"""

from __future__ import annotations

import math

from jaxllm.engine.metrics import EngineMetrics, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name without prefix, type, help, EngineMetrics attribute), in vLLM's order and words.
_GAUGES = [
    ("num_requests_running", "Number of requests in model execution batches.", "num_requests_running"),
    ("num_requests_waiting", "Number of requests waiting to be processed.", "num_requests_waiting"),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
]
_COUNTERS = [
    ("num_preemptions_total", "Cumulative number of preemption from the engine.", "num_preemptions_total"),
    ("prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens_total"),
    ("generation_tokens_total", "Number of generation tokens processed.", "generation_tokens_total"),
    ("prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries_total"),
    ("prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits_total"),
]
_HISTOGRAMS = [
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", "time_to_first_token"),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "inter_token_latency"),
    ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e_request_latency"),
]
# vLLM always reports these finish reasons, zero or not.
_FINISH_REASONS = ("stop", "length", "abort")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_metrics(metrics: EngineMetrics, model_name: str, prefix: str = "jaxllm") -> str:
    labels = f'engine="0",model_name="{_escape(model_name)}"'
    lines: list[str] = []

    def header(name: str, kind: str, doc: str) -> str:
        full = f"{prefix}:{name}"
        lines.append(f"# HELP {full} {doc}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    for name, doc, attr in _GAUGES:
        full = header(name, "gauge", doc)
        lines.append(f"{full}{{{labels}}} {_number(getattr(metrics, attr))}")
    for name, doc, attr in _COUNTERS:
        full = header(name, "counter", doc)
        lines.append(f"{full}{{{labels}}} {_number(getattr(metrics, attr))}")
    full = header("request_success_total", "counter", "Count of successfully processed requests.")
    reasons = dict.fromkeys(_FINISH_REASONS, 0) | metrics.request_success_total
    for reason, count in reasons.items():
        lines.append(f'{full}{{{labels},finished_reason="{_escape(reason)}"}} {_number(count)}')
    for name, doc, attr in _HISTOGRAMS:
        full = header(name, "histogram", doc)
        _histogram(lines, full, labels, getattr(metrics, attr))
    return "\n".join(lines) + "\n"


def _histogram(lines: list[str], full: str, labels: str, hist: Histogram) -> None:
    for bound, cumulative in zip((*hist.buckets, math.inf), hist.cumulative(), strict=True):
        lines.append(f'{full}_bucket{{{labels},le="{_number(bound)}"}} {_number(cumulative)}')
    lines.append(f"{full}_count{{{labels}}} {_number(hist.count)}")
    lines.append(f"{full}_sum{{{labels}}} {_number(hist.sum)}")
