"""FP8 W8A8 checkpoints (`fp8`, compressed-tensors float-quantized) and `--quantization fp8` on the dense
families: the XLA FP8 path against the same model on the jnp reference (the same fake quantization of
weights and activations, in float32), the loaded weights against the float checkpoint they dequantize
to, ignored modules, tensor parallelism, dummy FP8 weights, and the errors for what cannot be served."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import DEFAULT_MODEL, ModelConfig, ParallelConfig
from jaxllm.model_arch import UnsupportedModelError, load_arch
from jaxllm.models.quantized_fp8 import quantize_fp8_model
from jaxllm.runner import model_loading
from jaxllm.runner.model_loading import load_model
from pallas_kernels.fp8_matmul import Fp8Weights, fp8_matmul_reference
from tests.models.fp8_checkpoints import compressed_tensors_fp8_config, fp8_config, make_fp8_checkpoints
from tests.paged import PagedRunner

PROMPT = np.random.default_rng(7).integers(3, 320, 13).tolist()

CASES = {
    # fp8, per-tensor weight scales, static input scales, on Llama 3; o_proj left in float.
    "fp8_static_llama3": ("llama3", fp8_config(static=True, block=False,
                                               ignored_layers=["model.layers.0.self_attn.o_proj"])),
    # fp8, DeepSeek-V3's 128 x 128 weight_scale_inv blocks, dynamic per-token-group activations, on Qwen3.
    "fp8_block_qwen3": ("qwen3", fp8_config(static=False, block=True)),
    # compressed-tensors per-channel weights, dynamic per-token activations, on Qwen2 (q/k/v bias, tied
    # embeddings); layer 0's down_proj ignored by regex.
    "ct_channel_dynamic_qwen2": ("qwen2", compressed_tensors_fp8_config(
        weights="channel", static=False, ignore=["lm_head", r"re:.*layers\.0\.mlp\.down_proj$"])),
    # compressed-tensors per-tensor weights and static activations on GLM-4 (one fused gate_up_proj).
    "ct_tensor_static_glm4": ("glm4", compressed_tensors_fp8_config(weights="tensor", static=True, ignore=["lm_head"])),
}


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory):
    family, config = CASES[request.param]
    packed, plain = tmp_path_factory.mktemp(f"{request.param}_fp8"), tmp_path_factory.mktemp(request.param)
    input_scales = make_fp8_checkpoints(family, config, packed, plain, num_hidden_layers=1)  # one compile each
    return packed, plain, input_scales


def _run(model_dir, tp: int = 1, **model_options):
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32", **model_options),
                        ParallelConfig(tensor_parallel_size=tp))
    return loaded, PagedRunner(loaded, "xla").run(PROMPT, [13], 3)  # one bucket (16 tokens): one compile per run


def _run_on(matmul, monkeypatch, model_dir, **model_options):
    """_run with the FP8 twins on `matmul` instead of the XLA FP8 path."""
    with monkeypatch.context() as patch:
        patch.setattr(model_loading, "quantize_fp8_model", partial(quantize_fp8_model, matmul=matmul))
        return _run(model_dir, **model_options)


def _dequantized_matmul(x: jax.Array, w: Fp8Weights) -> jax.Array:
    """x [M, K] @ the twin's dequantized weights, activations unquantized: checks what was loaded alone."""
    k, groups = w.values.shape[-1], w.groups
    weights = (w.values.astype(jnp.float32).reshape(*w.values.shape[:-1], groups, k // groups)
               * w.scales[..., None]).reshape(w.values.shape)  # [*N, K]
    return jnp.einsum("mk,...k->m...", x, weights, precision=jax.lax.Precision.HIGHEST)


def _fp8_values(loaded) -> list[jax.Array]:
    return [leaf for leaf in loaded.leaves if leaf.dtype == jnp.float8_e4m3fn]


@pytest.mark.parametrize("checkpoints", list(CASES), indirect=True)
def test_fp8_checkpoint_matches_the_fake_quantized_reference(checkpoints, monkeypatch):
    packed, plain, input_scales = checkpoints
    loaded, (logits, tokens) = _run(packed)
    assert loaded.arch.quantization.fp8 is not None and _fp8_values(loaded)
    _, (ref_logits, ref_tokens) = _run_on(fp8_matmul_reference, monkeypatch, packed)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert tokens == ref_tokens
    # The weights as loaded are the float checkpoint's (the activations left unquantized).
    _, (weight_logits, _) = _run_on(_dequantized_matmul, monkeypatch, packed)
    _, (float_logits, _) = _run(plain)
    np.testing.assert_allclose(weight_logits, float_logits, atol=1e-3, rtol=1e-3)
    if input_scales:  # each fused part's static scale loaded beside its parts'
        q, k, v = (input_scales[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
        assert any(leaf.shape == (3,) and np.allclose(leaf, [q, k, v]) for leaf in loaded.leaves)


def test_ignored_layers_load_as_they_are(tmp_path):
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_fp8_checkpoints("llama3", fp8_config(static=False, block=False, ignored_layers=[
        "model.layers.1.self_attn", "down_proj"]), packed, plain)
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32"), ParallelConfig())
    shapes = sorted(tuple(v.shape) for v in _fp8_values(loaded))
    # layer 0's qkv [Hkv, G + 2, D, H] and o, both layers' gate_up [2, I, H]; no down_proj.
    assert shapes == sorted([(2, 4, 64, 128), (128, 256), (2, 256, 128), (2, 256, 128)])


@pytest.mark.parametrize("requested", ["fp8", "fp8_per_block"])
def test_quantization_fp8_quantizes_a_float_checkpoint_at_load(tmp_path, monkeypatch, requested):
    _, plain = tmp_path / "packed", tmp_path / "plain"
    make_fp8_checkpoints("llama3", fp8_config(static=False, block=False), tmp_path / "packed", plain,
                         num_hidden_layers=1)
    loaded, (logits, tokens) = _run(plain, quantization=requested)
    assert loaded.arch.quantization.fp8.online and len(_fp8_values(loaded)) == 4  # qkv, o, gate_up, down
    gate_up_scales = [np.asarray(leaf) for leaf in loaded.leaves if leaf.shape == (2, 256, 1)]  # K = 128: Kg = 1
    per_tensor = [np.unique(s[part]).size == 1 for s in gate_up_scales for part in (0, 1)]  # gate's, up's
    assert len(per_tensor) == 2 and all(per_tensor) == (requested == "fp8")
    _, (ref_logits, ref_tokens) = _run_on(fp8_matmul_reference, monkeypatch, plain, quantization=requested)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert tokens == ref_tokens


def test_engine_serves_fp8_weights():
    """The engine's ahead-of-time compiled buckets take the twins' e4m3 parameters: stories260K quantized at
    load decodes the tokens the same model gives outside the engine."""
    prompt = [1, *PROMPT]
    llm = LLM(DEFAULT_MODEL, dtype="float32", quantization="fp8", compilation_cache_dir="", max_num_seqs=2,
              max_num_batched_tokens=16, token_buckets=[16], max_model_len=64, async_scheduling=False)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    loaded = load_model(ModelConfig(model=DEFAULT_MODEL, dtype="float32", quantization="fp8"), ParallelConfig())
    assert _fp8_values(loaded)
    _, tokens = PagedRunner(loaded, "xla").run(prompt, [len(prompt)], 3)
    assert list(out[0].outputs[0].token_ids) == tokens


@pytest.mark.parametrize("checkpoints", ["fp8_block_qwen3"], indirect=True)
def test_tp2_matches_one_device(checkpoints):
    """Column-parallel q/k/v and gate/up by their output features, row-parallel o/down by K with one
    128-block of scales per shard."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    packed, _, _ = checkpoints
    _, (ref_logits, ref_tokens) = _run(packed)
    loaded, (logits, tokens) = _run(packed, tp=2)
    down_scales = next(v for v in loaded.leaves if v.shape == (128, 2))
    assert down_scales.sharding.shard_shape(down_scales.shape) == (128, 1)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens


@pytest.mark.parametrize("checkpoints", ["fp8_static_llama3"], indirect=True)
def test_dummy_fp8_weights(checkpoints):
    packed, _, _ = checkpoints
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32", load_format="dummy"), ParallelConfig())
    logits, _ = PagedRunner(loaded, "xla").run(PROMPT, [13], 1)
    values = _fp8_values(loaded)
    assert len(values) == 3  # o_proj ignored
    assert all(0 < float(jnp.abs(v.astype(jnp.float32)).max()) <= 448 for v in values)
    scales = [leaf for leaf in loaded.leaves if leaf.shape == (2, 4, 64, 1)]
    assert scales and all(s.dtype == jnp.float32 and float(s.min()) > 0 for s in scales)
    assert np.isfinite(logits).all()


def test_requested_fp8_must_match_the_checkpoint(tmp_path):
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    make_fp8_checkpoints("qwen3", compressed_tensors_fp8_config(weights="channel", static=False, ignore=[]),
                         packed, plain)
    with pytest.raises(ValueError, match=r"--quantization fp8 does not match .* \(quant_method compressed-tensors\)"):
        load_model(ModelConfig(model=str(packed), quantization="fp8"), ParallelConfig())
    with pytest.raises(ValueError, match="--quantization awq does not match"):
        load_model(ModelConfig(model=str(packed), quantization="awq"), ParallelConfig())


LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.mark.parametrize(("config", "message"), [
    (fp8_config(static=False, block=False) | {"fmt": "e5m2"}, "fp8 fmt 'e5m2'"),
    (fp8_config(static=True, block=True), "fp8 block-scaled weights with static activations"),
    (fp8_config(static=False, block=True) | {"weight_block_size": [64, 64]}, r"fp8 weight block \[64, 64\]"),
    (compressed_tensors_fp8_config(weights="channel", static=False, ignore=[])
     | {"config_groups": {"g": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8,
                                                                   "strategy": "channel"}}}},
     r"compressed-tensors FP8 weight-only \(no input_activations\)"),
])
def test_unsupported_fp8_settings_are_named(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA | {"quantization_config": config}))
    with pytest.raises(UnsupportedModelError, match=f"quantization_config: {message}.* is not supported"):
        load_arch(tmp_path)
