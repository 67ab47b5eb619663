"""gpt-oss with MXFP4 experts (`quantization_config.quant_method = "mxfp4"`): the test packs a tiny
random checkpoint's expert weights into MXFP4 blocks and scales as the published layout has them,
then compares jaxllm on the packed checkpoint with transformers on the dequantized weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.model_arch import UnsupportedModelError, load_arch
from jaxllm.runner.model_loading import load_model
from pallas_kernels.grouped_matmul.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from tests.models.hf_tiny import hf_logits, make_checkpoint
from tests.paged import PagedRunner

PROMPT = np.random.default_rng(3).integers(3, 320, 330).tolist()
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(packed MXFP4 checkpoint, the same weights dequantized as a float32 checkpoint)."""
    packed, plain = tmp_path_factory.mktemp("mxfp4"), tmp_path_factory.mktemp("dequantized")
    make_checkpoint("gpt_oss", plain)
    tensors = load_file(plain / "model.safetensors")
    experts = [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    packed_tensors = {n: t for n, t in tensors.items() if n not in experts}
    for name in experts:
        # [E, out, in] rows. Every array saved contiguous: safetensors writes an array's memory as it lies.
        blocks, scales = map(np.ascontiguousarray, quantize_mxfp4(np.swapaxes(tensors[name], -1, -2)))
        tensors[name] = np.ascontiguousarray(np.swapaxes(dequantize_mxfp4(blocks, scales, np.float32), -1, -2))
        packed_tensors |= {f"{name}_blocks": blocks, f"{name}_scales": scales}
    save_file(tensors, plain / "model.safetensors")
    save_file(packed_tensors, packed / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (packed / "config.json").write_text(json.dumps(config))
    return packed, plain


def test_mxfp4_experts_match_transformers_on_the_dequantized_weights(checkpoints):
    packed, plain = checkpoints
    loaded = load_model(ModelConfig(model=str(packed), dtype="float32"), ParallelConfig())
    assert loaded.arch.quantization.method == "mxfp4"
    ours, decoded = PagedRunner(loaded, "xla").run(PROMPT, [200, 130], 6)
    ref = hf_logits(plain, PROMPT + decoded).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)
    assert decoded == [int(np.argmax(ref[len(PROMPT) - 1 + i])) for i in range(6)]


def test_unsupported_quantization_is_named(checkpoints, tmp_path):
    _, plain = checkpoints
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'bitsandbytes' is not supported; supported: mxfp4"):
        load_arch(tmp_path)
