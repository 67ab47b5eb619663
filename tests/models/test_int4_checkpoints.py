"""int4 weight-only checkpoints (AWQ, GPTQ, compressed-tensors pack-quantized) on the dense families:
jaxllm on the packed checkpoint against jaxllm on the same weights dequantized to float32 (itself
checked against transformers in test_parity.py), tensor parallelism, dummy int4 weights, and the
errors for what cannot be served."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import LLM, SamplingParams
from jaxllm.config import DEFAULT_MODEL, ModelConfig, ParallelConfig
from jaxllm.model_arch import Quantization, UnsupportedModelError, load_arch
from jaxllm.models import llama
from jaxllm.models.quantized import Int4Kernel, gpu_int4_matmul, quantize_model
from jaxllm.models.sharding import ShardingRules
from jaxllm.runner.model_loading import load_model
from tests.models.int4_checkpoints import (
    awq_config,
    compressed_tensors_config,
    gptq_config,
    make_int4_checkpoints,
)
from tests.paged import PagedRunner

PROMPT = np.random.default_rng(5).integers(3, 320, 320).tolist()

CASES = {
    # AWQ on Llama 3, layer 1's attention left in float (substring match, as vLLM's).
    "awq_llama3": ("llama3", awq_config(["layers.1.self_attn"])),
    # GPTQ v1, asymmetric, act-order (g_idx) on GLM-4 (q/k/v bias, one fused gate_up_proj in the checkpoint).
    "gptq_desc_act_glm4": ("glm4", gptq_config(desc_act=True, sym=False, checkpoint_format="gptq")),
    # GPTQ v2 zero points, symmetric, on Qwen3 (q/k norms).
    "gptq_v2_sym_qwen3": ("qwen3", gptq_config(desc_act=False, sym=True, checkpoint_format="gptq_v2")),
    # compressed-tensors pack-quantized with zero points on Qwen2 (q/k/v bias, tied embeddings); one layer's
    # down_proj ignored by regex.
    "ct_qwen2": ("qwen2", compressed_tensors_config(symmetric=False, ignore=["lm_head", r"re:.*layers\.0\.mlp\.down"])),
}


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory):
    family, config = CASES[request.param]
    packed, plain = tmp_path_factory.mktemp(f"{request.param}_int4"), tmp_path_factory.mktemp(request.param)
    make_int4_checkpoints(family, config, packed, plain)
    return packed, plain


def _run(model_dir, tp: int = 1, **model_options):
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32", **model_options),
                        ParallelConfig(tensor_parallel_size=tp))
    return loaded, PagedRunner(loaded, "xla").run(PROMPT, [160, 160], 5)  # two buckets: 256 and 16 tokens


def _int4_values(loaded) -> list[jax.Array]:
    """The twins' codes (int8 on CPU: quantized.Int4Kernel)."""
    assert loaded.mesh.devices.flat[0].platform == "cpu"
    return [leaf for leaf in loaded.leaves if leaf.dtype == jnp.int8]


@pytest.mark.parametrize("checkpoints", list(CASES), indirect=True)
def test_int4_checkpoint_matches_its_dequantized_float_model(checkpoints):
    packed, plain = checkpoints
    loaded, (logits, tokens) = _run(packed)
    float_loaded, (ref_logits, ref_tokens) = _run(plain)
    assert loaded.arch.quantization.method == json.loads((packed / "config.json").read_text())[
        "quantization_config"]["quant_method"]
    assert _int4_values(loaded) and not _int4_values(float_loaded)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert tokens == ref_tokens


def test_modules_to_not_convert_load_as_they_are(tmp_path):
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_int4_checkpoints("llama3", awq_config(["layers.1.self_attn", "mlp.down_proj"]), packed, plain)
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32"), ParallelConfig())
    int4_shapes = sorted(tuple(v.shape) for v in _int4_values(loaded))
    # layer 0's qkv [H, Hkv, G + 2, D] and o, both layers' gate_up [H, I, 2]; no down_proj.
    assert int4_shapes == sorted([(128, 2, 4, 64), (256, 128), (128, 256, 2), (128, 256, 2)])


def test_engine_serves_an_int4_checkpoint(tmp_path):
    """The engine's ahead-of-time compiled buckets take the twins' parameters (int8 codes on CPU)."""
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_int4_checkpoints("llama3", awq_config(), packed, plain, vocab_size=512)
    for model_dir in (packed, plain):  # stories260K's tokenizer (512 tokens)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(DEFAULT_MODEL) / name, model_dir / name)
    prompt = [1, *PROMPT[:47]]
    llm = LLM(str(packed), dtype="float32", compilation_cache_dir="", max_num_seqs=2, max_num_batched_tokens=64,
              token_buckets=[64], max_model_len=256, async_scheduling=False)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    float_model = load_model(ModelConfig(model=str(plain), dtype="float32"), ParallelConfig())
    _, float_tokens = PagedRunner(float_model, "xla").run(prompt, [48], 4)
    assert list(out[0].outputs[0].token_ids) == float_tokens


@pytest.mark.parametrize("checkpoints", ["gptq_desc_act_glm4"], indirect=True)
def test_tp2_matches_one_device(checkpoints):
    """Row-parallel o/down shards of whole groups, with desc_act's permutation of their inputs."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    packed, _ = checkpoints
    _, (ref_logits, ref_tokens) = _run(packed)
    loaded, (logits, tokens) = _run(packed, tp=2)
    down_values = next(v for v in _int4_values(loaded) if v.shape == (256, 128))
    assert down_values.sharding.shard_shape(down_values.shape) == (128, 128)  # K split, one group per shard
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens


def test_tp4_with_replicated_kv_heads_matches_one_device(tmp_path):
    """tp=4 over 2 KV heads keeps q, k and v apart (q sharded by its heads, k/v replicated): three twins."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_int4_checkpoints("llama3", gptq_config(desc_act=True, sym=True, checkpoint_format="gptq"), packed, plain,
                          num_attention_heads=8, intermediate_size=512)
    _, (ref_logits, ref_tokens) = _run(packed)
    loaded, (logits, tokens) = _run(packed, tp=4)
    assert loaded.rules.kv_heads is None
    shapes = [v.shape for v in _int4_values(loaded)]
    assert shapes.count((128, 512)) == 2 and shapes.count((128, 128)) == 4  # q; k and v, in both layers
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens


@pytest.mark.parametrize("checkpoints", ["awq_llama3"], indirect=True)
def test_tp_that_splits_a_group_is_a_clear_error(checkpoints):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    packed, _ = checkpoints
    with pytest.raises(ValueError, match=r"o_proj: tensor_parallel_size=4 splits its 256 input features into "
                                         r"shards of 64, not whole quantization groups of 128"):
        load_model(ModelConfig(model=str(packed), dtype="float32"), ParallelConfig(tensor_parallel_size=4))


@pytest.mark.parametrize("checkpoints", ["gptq_desc_act_glm4"], indirect=True)
def test_dummy_int4_weights(checkpoints):
    packed, _ = checkpoints
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32", load_format="dummy"), ParallelConfig())
    logits, _ = PagedRunner(loaded, "xla").run(PROMPT[:16], [16], 1)
    layer0 = [leaf for leaf in loaded.leaves if leaf.shape in ((128, 2, 4, 64), (2, 4, 64), (1, 2, 4, 64), (128,))]
    assert any(v.dtype == jnp.int8 and -8 <= int(v.min()) < int(v.max()) <= 7 for v in layer0)
    scales = [leaf for leaf in loaded.leaves if leaf.shape == (1, 2, 4, 64)]  # qkv scales and zeros
    assert scales and all(s.dtype == jnp.float32 for s in scales)
    perms = [np.asarray(leaf) for leaf in loaded.leaves if leaf.dtype == jnp.int32 and leaf.ndim == 1]
    assert perms and all(sorted(p.tolist()) == list(range(len(p))) for p in perms)  # desc_act permutations
    assert np.isfinite(logits).all()


def test_requested_quantization(tmp_path):
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_int4_checkpoints("qwen3", gptq_config(desc_act=False, sym=True, checkpoint_format="gptq"), packed, plain)
    with pytest.raises(ValueError, match="--quantization awq does not match the checkpoint's quantization_config"):
        load_model(ModelConfig(model=str(packed), quantization="awq"), ParallelConfig())
    with pytest.raises(ValueError, match="--quantization awq needs a awq checkpoint"):
        load_model(ModelConfig(model=str(plain), quantization="awq"), ParallelConfig())
    assert load_model(ModelConfig(model=str(packed), dtype="float32", quantization="gptq_marlin"),
                      ParallelConfig()).arch.quantization.method == "gptq"
    loaded = load_model(ModelConfig(model=str(plain), dtype="float32", quantization="awq", load_format="dummy"),
                        ParallelConfig())
    assert loaded.arch.quantization.method == "awq" and len(_int4_values(loaded)) == 2 * 4  # qkv, o, gate_up, down


@pytest.mark.parametrize(("config", "message"), [
    (gptq_config(desc_act=False, sym=True, checkpoint_format="gptq") | {"bits": 8}, "gptq bits=8"),
    (awq_config() | {"version": "gemv"}, "awq version 'gemv'"),
    (awq_config() | {"group_size": -1}, "awq group_size -1"),
    (compressed_tensors_config(symmetric=True, ignore=[]) | {"format": "marlin-24"},
     "compressed-tensors format 'marlin-24'"),
])
def test_unsupported_settings_are_named(tmp_path, config, message):
    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(llama | {"quantization_config": config}))
    with pytest.raises(UnsupportedModelError, match=f"quantization_config: {message}.* is not supported"):
        load_arch(tmp_path)


@pytest.mark.parametrize("num_tokens", [1, 256])
def test_gpu_twins_lower_to_the_mosaic_kernel_for_cuda(num_tokens):
    """Llama-3.1-8B's q/k/v and gate/up twins, bf16, on the GPU kernel choice: each lowers to one Mosaic GPU call
    on the [K, N] view of its weights (no other kernel reads the codes)."""
    arch = load_arch(Path("bench/configs/llama-3.1-8b"))
    arch = dataclasses.replace(arch, num_layers=1, quantization=Quantization("awq"))
    model = llama.abstract_model(arch, jnp.bfloat16)
    quantize_model(model, arch, jnp.bfloat16, ShardingRules(), 1, Int4Kernel(gpu_int4_matmul))
    layer = model.model.layers[0]
    x = jax.ShapeDtypeStruct((num_tokens, arch.hidden_size), jnp.bfloat16)
    for twin in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
        graphdef, state = nnx.split(twin)
        text = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)).trace(state, x).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu") >= 1 and "dot_general" not in text
