"""/metrics: Prometheus text from the engine's metrics, with jaxllm: or vLLM's own names."""

from __future__ import annotations

import re
from typing import Any

import httpx

from jaxllm.engine.metrics import EngineMetrics
from serve.metrics_text import render_metrics
from tests.serve.conftest import LiveServer

# The vLLM names dashboards query (vllm/v1/metrics/loggers.py), as exposed by prometheus_client.
VLLM_NAMES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name; checks every line is a comment or a well-formed sample of a declared family."""
    families, samples = set(), {}
    for line in text.strip().split("\n"):
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        name, labels, value = SAMPLE.match(line).groups()
        assert any(name == f or name.startswith(f + "_") for f in families), name
        samples.setdefault(name, []).append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def test_vllm_names_are_exactly_vllms() -> None:
    metrics = EngineMetrics()
    metrics.time_to_first_token.observe(0.03)
    metrics.request_success_total["stop"] = 2
    text = render_metrics(metrics, "m", prefix="vllm")
    families = {line.split()[2] for line in text.split("\n") if line.startswith("# TYPE")}
    assert families == VLLM_NAMES
    samples = parse(text)
    buckets = samples["vllm:time_to_first_token_seconds_bucket"]
    assert [b for labels, b in buckets if labels["le"] in ("0.02", "0.04", "+Inf")] == [0, 1, 1]
    assert {labels["finished_reason"]: v for labels, v in samples["vllm:request_success_total"]}["stop"] == 2
    assert all(labels["model_name"] == "m" for values in samples.values() for labels, _ in values)


def test_metrics_endpoint_counts_requests(live: LiveServer, http: httpx.Client) -> None:
    def counters() -> dict[str, Any]:
        samples = parse(httpx.get(live.url + "/metrics").text)
        return {name: sum(v for _, v in values) for name, values in samples.items()}

    before = counters()
    assert http.post("/v1/completions", json={"prompt": "Lily", "max_tokens": 5}).status_code == 200
    after = counters()
    assert after["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] == 5
    assert after["jaxllm:prompt_tokens_total"] > before["jaxllm:prompt_tokens_total"]
    assert after["jaxllm:e2e_request_latency_seconds_count"] == before["jaxllm:e2e_request_latency_seconds_count"] + 1
    assert after["jaxllm:request_success_total"] == before["jaxllm:request_success_total"] + 1
    assert not any(name.startswith("vllm:") for name in after)
