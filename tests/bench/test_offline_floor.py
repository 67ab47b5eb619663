"""bench.offline_floor: the roofline of the offline run scales as its two ceilings say."""

from __future__ import annotations

import pytest

from bench import workload
from bench.offline_floor import offline_floor


def test_floor_scales_with_the_ceilings():
    base = offline_floor(3.0e12, 750e12, num_prompts=100)
    twice = offline_floor(6.0e12, 1500e12, num_prompts=100)
    assert twice["floor_s"] == pytest.approx(base["floor_s"] / 2, rel=0.02)
    assert base["decode_steps"] == max(n for _, n in workload.sharegpt_like(100))


def test_a_memory_bound_run_is_bound_by_weight_reads_per_step():
    slow_memory = offline_floor(1.0e9, 1e18, num_prompts=20)
    # Every decode step reads the weights (7.5e9 non-embedding params in bf16) at 1 GB/s: 15 s a step.
    assert slow_memory["weight_bound_decode_steps"] == slow_memory["decode_steps"]
    assert slow_memory["decode_s"] >= slow_memory["decode_steps"] * 14.9
