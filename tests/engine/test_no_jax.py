"""The engine runs end to end (scheduler, block manager, fake runner, async loop) with jax unimportable."""

from __future__ import annotations

import subprocess
import sys

from tests.jax_blocker import BLOCK_JAX

SCRIPT = BLOCK_JAX + """

import asyncio
from jaxllm.config import CacheConfig, EngineConfig, EngineLimits, SchedulerConfig
from jaxllm.engine.async_engine import AsyncEngine
from tests.engine.fake_runner import FakeModelRunner
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.sampling_params import SamplingParams

config = EngineConfig(cache=CacheConfig(block_size=4),
                      scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, async_scheduling=True))
limits = EngineLimits.given(config, max_model_len=64, num_pages=8)
engine = LLMEngine(config, limits, FakeModelRunner(512, 4), None, 512, [2], log_stats=False)
async_engine = AsyncEngine(engine)
async_engine.start()

async def main():
    params = SamplingParams(max_tokens=5, ignore_eos=True, detokenize=False)
    return [out async for out in async_engine.generate(list(range(10, 30)), params, "r")]

outputs = asyncio.run(main())
async_engine.shutdown()
assert outputs[-1].finished and len([t for o in outputs for t in o.outputs[0].token_ids]) == 5
assert engine.scheduler.num_preemptions == 0 and engine.block_manager.num_free_pages == 8
assert not any(m.split(".")[0] in ("jax", "jaxlib", "flax") for m in sys.modules), "jax was imported"
print("ok")
"""


def test_engine_runs_with_jax_blocked():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_blocker_blocks_jax():
    result = subprocess.run([sys.executable, "-c", BLOCK_JAX + "import jax\n"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "jax is blocked here" in result.stderr
