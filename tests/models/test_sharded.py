"""Tensor parallelism on CPU meshes: sharded logits equal one device's.

The checkpoints have 4 query heads and 2 KV heads: tp=2 shards the KV heads, tp=4 replicates
them (more devices than KV heads). Every step blocks (jax-notes item 11: back-to-back async
collectives can deadlock the 2-core CPU runtime).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.models.sharding import rules_for
from jaxllm.runner.model_loading import load_model
from tests.models.hf_tiny import make_checkpoint
from tests.paged import PagedRunner

PROMPT = np.random.default_rng(2).integers(3, 320, 150).tolist()


# (family, tp, expert parallel). tp=4 replicates the 2 KV heads: the Llama-family checkpoints cover it.
CASES = [("llama3", 2, False), ("llama3", 4, False), ("qwen2", 2, False), ("qwen2", 4, False), ("gpt2", 2, False),
         ("glm4", 2, False), ("mixtral", 2, False), ("mixtral", 2, True), ("qwen3_moe", 2, True), ("gpt_oss", 2, False),
         ("deepseek_v3", 2, False)]


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def one_device(checkpoint):
    return _run(checkpoint, 1)[1]


def _run(model_dir, tp: int, expert_parallel: bool = False):
    parallel = ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=expert_parallel)
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"), parallel)
    return loaded, PagedRunner(loaded, "xla").run(PROMPT, [100, 50], 4)


@pytest.mark.parametrize(("checkpoint", "tp", "expert_parallel"), CASES, indirect=["checkpoint"])
def test_tp_matches_one_device(checkpoint, one_device, tp, expert_parallel):
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    ref, ref_tokens = one_device
    loaded, (out, tokens) = _run(checkpoint, tp, expert_parallel)
    o_weight = next(x for x in loaded.leaves if x.ndim == 2 and x.shape == (64, 64))  # o_proj / c_proj
    assert len(o_weight.sharding.device_set) == tp  # really sharded
    kv_heads = loaded.arch.num_kv_heads  # MLA: the latent pages are whole on every device
    assert loaded.rules.kv_heads == ("tp" if kv_heads % tp == 0 and loaded.arch.mla is None else None)
    if loaded.arch.moe is not None:  # experts split along the intermediate dim, or spread whole
        moe = loaded.arch.moe
        gate_up = next(x for x in loaded.leaves if x.shape == (moe.num_experts, 64, 2, moe.intermediate_size))
        split = gate_up.sharding.shard_shape(gate_up.shape)
        assert split == ((gate_up.shape[0] // tp, *gate_up.shape[1:]) if expert_parallel
                         else (*gate_up.shape[:3], gate_up.shape[3] // tp))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens


@pytest.mark.parametrize("checkpoint", ["llama3"], indirect=True)
def test_bad_tp_is_a_clear_error(checkpoint):
    from jaxllm.model_arch import load_arch

    with pytest.raises(ValueError, match="attention heads"):
        rules_for(load_arch(checkpoint), 3)
    with pytest.raises(ValueError, match="visible devices"):
        load_model(ModelConfig(model=str(checkpoint)), ParallelConfig(tensor_parallel_size=8))
