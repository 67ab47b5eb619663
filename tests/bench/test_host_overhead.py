"""bench.host_overhead drives the real engine's host side (scheduler, input batch, sampler flags, detokenizer)
over a stand-in runner: it must keep running as those interfaces change, since its figure is a floor."""

from __future__ import annotations

from bench import host_overhead


def test_host_overhead_runs_the_engines_host_side() -> None:
    result = host_overhead.main(["--num-requests", "8", "--prompt-len", "32", "--steps", "4", "--max-model-len", "256"])
    assert result["running_requests"] == 8 and result["steps"] == 4
    assert result["engine_step_ms"] > 0 and result["schedule_ms"] > 0 and result["runner_host_ms"] > 0
