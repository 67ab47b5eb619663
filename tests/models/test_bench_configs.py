"""Every published model shape in bench/configs reads and builds (shapes only, no memory) with the
parameter count its publisher states, so a family's layout matches the real checkpoints', and splits over
two devices."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxllm.model_arch import load_arch
from jaxllm.models import family
from jaxllm.models.sharding import rules_for

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
# Total parameters as published (model cards), embeddings and heads included.
PUBLISHED = {"llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "glm-4-9b": 9.4e9, "qwen3-30b-a3b": 30.5e9,
             "gpt-oss-20b": 20.9e9, "deepseek-v2-lite": 15.7e9, "mixtral-8x7b": 46.7e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bench_config_builds_with_the_published_size(name):
    arch = load_arch(CONFIGS / name)
    model = family(arch).abstract_model(arch, jnp.bfloat16)
    params = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model)))
    assert params == pytest.approx(PUBLISHED[name], rel=0.01)
    rules_for(arch, 2)  # raises where two devices cannot split it
