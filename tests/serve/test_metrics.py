"""/metrics: vLLM 0.34.0's families through prometheus_client, with jaxllm: or vLLM's own names."""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from jaxllm.engine.metrics import EngineMetrics, FinishedRequest
from serve.prometheus_metrics import metrics_registry, render_metrics
from tests.serve.conftest import LiveServer, wait_until

# vLLM 0.34.0's families with its default config (vllm/v1/metrics/loggers.py), as prometheus_client's
# parser names them (counters without `_total`), and their types.
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge", "vllm:engine_sleep_state": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter", "vllm:external_prefix_cache_hits": "counter",
    "vllm:mm_cache_queries": "counter", "vllm:mm_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter", "vllm:prompt_tokens_by_source": "counter", "vllm:prompt_tokens_cached": "counter",
    "vllm:prompt_tokens_cached_by_source": "counter", "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram", "vllm:iteration_tokens_total": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram", "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram", "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:request_num_preemptions": "histogram",
    "vllm:request_prefill_kv_computed_tokens": "histogram",
}
# Each family's labels beyond vLLM's model_name and engine, with every value vLLM always exports.
EXTRA_LABELS = {
    "vllm:num_requests_waiting_by_reason": ("reason", {"capacity", "deferred"}),
    "vllm:engine_sleep_state": ("sleep_state", {"awake", "weights_offloaded", "discard_all"}),
    "vllm:prompt_tokens_by_source": ("source", {"local_compute", "local_cache_hit", "external_kv_transfer"}),
    "vllm:prompt_tokens_cached_by_source": ("source", {"device", "host", "p2p", "disk", "external_unspecified"}),
    "vllm:request_success": ("finished_reason", {"stop", "length", "abort", "error", "repetition"}),
}
# vLLM's default buckets (vllm/v1/metrics/buckets.py), as its `le` labels read.
VLLM_TTFT_LE = ["0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
                "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0", "640.0", "2560.0", "+Inf"]
VLLM_PARAMS_N_LE = ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
VLLM_TOKENS_LE_4096 = ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0", "1000.0", "2000.0",
                       "+Inf"]  # 1-2-5 up to max_model_len


def engine_families(metrics: EngineMetrics, prefix: str) -> dict[str, Any]:
    body, content_type = render_metrics(metrics_registry(lambda: metrics, "m", prefix), None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return {name: f for name, f in families.items() if name.startswith(prefix + ":")}


def by_labels(samples: list[Sample], suffix: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples if s.name.endswith(suffix)}


def finished(**fields: float) -> FinishedRequest:
    defaults = dict(e2e_latency=1.2, queue_time=0.1, prefill_time=0.05, decode_time=1.0, inference_time=1.05,
                    num_prompt_tokens=40, num_cached_tokens=16, num_generation_tokens=11, max_tokens=16,
                    num_preemptions=0)
    return FinishedRequest(**(defaults | fields))


def test_vllm_names_types_labels_and_buckets_parse_with_prometheus_client() -> None:
    metrics = EngineMetrics(max_model_len=4096)
    metrics.first_token(0.03, prompt_tokens=40, cached_prompt_tokens=16)
    metrics.request_finished("stop", finished())
    metrics.request_finished("length", finished())
    metrics.user_request_finished(n=2, max_generation_tokens=11)
    metrics.next_token(0.02)  # counted at the step's end, in set_gauges
    metrics.set_gauges(running=3, waiting=5, deferred=2, kv_cache_usage=0.25, num_free_pages=7, preemptions=1,
                       prefix_cache_queries=40, prefix_cache_hits=16)
    families = engine_families(metrics, "vllm")
    assert {name: f.type for name, f in families.items()} == VLLM_FAMILIES
    for name, family in families.items():
        extra, values = EXTRA_LABELS.get(name, (None, None))
        for sample in family.samples:
            assert ("le" in sample.labels) == sample.name.endswith("_bucket"), sample
            assert set(sample.labels) - {"le"} == {"model_name", "engine", *([extra] if extra else [])}, sample
            assert (sample.labels["model_name"], sample.labels["engine"]) == ("m", "0"), sample
        if extra:
            assert {s.labels[extra] for s in family.samples} == values, name

    def le(name: str) -> list[str]:
        return [s.labels["le"] for s in families[name].samples if s.name.endswith("_bucket")]

    assert le("vllm:time_to_first_token_seconds") == VLLM_TTFT_LE
    assert le("vllm:request_params_n") == VLLM_PARAMS_N_LE
    assert le("vllm:request_prompt_tokens") == VLLM_TOKENS_LE_4096
    ttft = {s.labels["le"]: s.value for s in families["vllm:time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket")}
    assert (ttft["0.02"], ttft["0.04"], ttft["+Inf"]) == (0, 1, 1)
    samples = {s.name: s.value for f in families.values() for s in f.samples if "le" not in s.labels}
    assert samples["vllm:request_prefill_kv_computed_tokens_sum"] == 2 * (40 - 16)
    assert samples["vllm:prompt_tokens_total"] == 40 and samples["vllm:prompt_tokens_cached_total"] == 16
    assert samples["vllm:kv_cache_usage_perc"] == 0.25
    assert (samples["vllm:generation_tokens_total"], samples["vllm:inter_token_latency_seconds_count"]) == (2, 1)
    assert by_labels(families["vllm:request_success"].samples, "_total", "finished_reason") == {
        "stop": 1, "length": 1, "abort": 0, "error": 0, "repetition": 0}
    assert by_labels(families["vllm:num_requests_waiting_by_reason"].samples, "", "reason") == {
        "capacity": 3, "deferred": 2}
    assert by_labels(families["vllm:prompt_tokens_by_source"].samples, "_total", "source") == {
        "local_compute": 24, "local_cache_hit": 16, "external_kv_transfer": 0}


def test_render_with_every_histogram_filled_takes_a_median_under_10ms_measured_2ms() -> None:
    metrics = EngineMetrics(max_model_len=32768)
    for i in range(1000):
        metrics.first_token(i / 100, prompt_tokens=i, cached_prompt_tokens=0)
        metrics.next_token(i / 1000)
        metrics.step_scheduled(i)
        metrics.request_finished("stop", finished(e2e_latency=i / 10, num_prompt_tokens=i, num_generation_tokens=i))
        metrics.user_request_finished(n=1 + i % 30, max_generation_tokens=i)
    registry = metrics_registry(lambda: metrics, "m", "jaxllm")
    times = []
    for _ in range(20):
        start = time.perf_counter()
        render_metrics(registry, None)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.010, times


def test_metrics_endpoint_counts_requests_under_jaxllm_names(live: LiveServer, http: httpx.Client) -> None:
    def samples() -> dict[str, float]:
        response = httpx.get(live.url + "/metrics")
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                if "le" not in s.labels:
                    out[s.name] = out.get(s.name, 0) + s.value
        return out

    before = samples()
    assert http.post("/v1/completions", json={"prompt": "Lily", "max_tokens": 5}).status_code == 200
    after = samples()
    assert after["jaxllm:generation_tokens_total"] - before["jaxllm:generation_tokens_total"] == 5
    assert after["jaxllm:prompt_tokens_total"] > before["jaxllm:prompt_tokens_total"]
    assert after["jaxllm:e2e_request_latency_seconds_count"] == before["jaxllm:e2e_request_latency_seconds_count"] + 1
    assert after["jaxllm:request_generation_tokens_sum"] - before["jaxllm:request_generation_tokens_sum"] == 5
    assert after["jaxllm:request_params_max_tokens_sum"] - before["jaxllm:request_params_max_tokens_sum"] == 5
    assert after["jaxllm:request_success_total"] == before["jaxllm:request_success_total"] + 1
    assert after["process_resident_memory_bytes"] > 0  # the HTTP process's own collectors, as vLLM's registry
    assert not any(name.startswith("vllm:") for name in after)


def test_openmetrics_when_the_scraper_asks_for_it(live: LiveServer) -> None:
    response = httpx.get(live.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    assert "jaxllm:num_requests_running" in {f.name for f in text_string_to_metric_families(
        response.text.replace("# EOF\n", ""))}


def test_running_and_waiting_gauges_count_every_sequence_of_a_fan_out(live: LiveServer, http: httpx.Client) -> None:
    def gauges() -> tuple[float, float]:
        values = {f.name: f.samples[0].value for f in text_string_to_metric_families(httpx.get(live.url + "/metrics")
                                                                                      .text)}
        return values["jaxllm:num_requests_running"], values["jaxllm:num_requests_waiting"]

    n = 200  # the stand-in engine runs at most 128 sequences at a time (fewer once its pages run out)
    body = {"prompt": "Lily", "max_tokens": 200, "n": n, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        running, waiting = gauges()
        assert (running + waiting, waiting >= n - 128) == (n, True), (running, waiting)
    wait_until(lambda: gauges() == (0, 0))
