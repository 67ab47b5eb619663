"""The bench scripts' statistics on synthetic numbers (no engine, no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.common import fold_into_vocab, requests_for, summary_ms
from bench.latency import latency_stats
from bench.serve import arrival_offsets
from bench.serve_metrics import RequestResult, summarize, table


def test_summary_ms_converts_seconds_and_takes_p99():
    s = summary_ms([0.001 * i for i in range(1, 101)], "x")
    assert s["mean_x_ms"] == pytest.approx(50.5)
    assert s["median_x_ms"] == pytest.approx(50.5)
    assert s["p99_x_ms"] == pytest.approx(99.01)
    assert all(math.isnan(v) for v in summary_ms([], "x").values())


def test_latency_stats_per_token_and_decode():
    # 4 tokens per request: first token after 10 ms, then 30 ms per token -> e2e 100 ms
    stats = latency_stats([0.1, 0.1, 0.2], output_len=4, ttfts_s=[0.01] * 3, e2e_engine_s=[0.1] * 3)
    assert stats["num_iters"] == 3
    assert stats["median_latency_ms"] == pytest.approx(100)
    assert stats["mean_per_token_ms"] == pytest.approx(1000 * (0.4 / 3) / 4, abs=1e-3)
    assert stats["median_ttft_ms"] == pytest.approx(10)
    assert stats["median_decode_per_token_ms"] == pytest.approx(30)
    assert "median_ttft_ms" not in latency_stats([0.1], output_len=4)


def test_serve_summary_from_timestamps():
    # request a: sent at 0, chunks at 0.1, 0.15, 0.25, done 0.25; request b: sent 0.05, chunks 0.2, 0.3, done 0.3
    a = RequestResult(input_tokens=10, output_tokens=3, start=0.0, chunks=[0.1, 0.15, 0.25], end=0.25)
    b = RequestResult(input_tokens=20, output_tokens=2, start=0.05, chunks=[0.2, 0.3], end=0.3)
    failed = RequestResult(input_tokens=5, start=0.0, end=0.01, error="HTTP 500: boom")
    r = summarize([a, b, failed], duration_s=0.5)
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert r["total_output_tokens"] == 5 and r["total_input_tokens"] == 30
    assert r["request_throughput"] == pytest.approx(4.0)
    assert r["output_tokens_per_s"] == pytest.approx(10.0) and r["total_tokens_per_s"] == pytest.approx(70.0)
    assert r["mean_ttft_ms"] == pytest.approx(125.0)  # 100 and 150
    assert r["median_tpot_ms"] == pytest.approx(np.median([150 / 2, 100 / 1]))  # (latency - ttft) / (n - 1)
    assert r["mean_itl_ms"] == pytest.approx(np.mean([50, 100, 100]), abs=1e-3)
    assert r["p99_itl_ms"] == pytest.approx(np.percentile([50, 100, 100], 99), abs=1e-3)
    text = table(r)
    assert all(line.startswith("|") for line in text.splitlines())
    assert "| Median TTFT (ms)" in text and "| P99 ITL (ms)" in text and "| Output token throughput (tok/s)" in text


def test_arrivals_all_at_once_or_poisson():
    assert not arrival_offsets(5, float("inf")).any()
    t = arrival_offsets(4000, 8.0)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert t[-1] / (len(t) - 1) == pytest.approx(1 / 8, rel=0.05)
    np.testing.assert_array_equal(t, arrival_offsets(4000, 8.0))  # seeded


def test_workload_folded_into_a_small_vocabulary():
    reqs = requests_for("sharegpt_like", 8)
    small = requests_for("sharegpt_like", 8, vocab_size=512)
    assert [n for _, n in small] == [n for _, n in reqs]
    assert [len(i) for i, _ in small] == [len(i) for i, _ in reqs]
    assert max(t for ids, _ in small for t in ids) < 512
    assert fold_into_vocab(reqs, 128256) is reqs  # the Llama-3 vocabulary holds the workload's ids
