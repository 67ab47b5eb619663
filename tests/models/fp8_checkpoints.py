"""Test helper: tiny random FP8 checkpoints (`fp8` per-tensor or 128 x 128 blocks; compressed-tensors
float-quantized per tensor, channel or block; static input scales where asked), quantized in numpy
(pallas_kernels/fp8_matmul/formats.py), each beside a float32 checkpoint of the same weights dequantized.

Dims hold 128 x 128 blocks: hidden 128, intermediate 256, 4 query heads and 2 KV heads of 64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from jaxllm.model_arch import read_quantization
from pallas_kernels.fp8_matmul.formats import (
    dequantize,
    per_feature_scales,
    quantize_blocks,
    quantize_per_channel,
    quantize_per_tensor,
)
from tests.models.hf_tiny import make_checkpoint

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
BLOCK = (128, 128)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")


def fp8_config(*, static: bool, block: bool, ignored_layers: list[str] | None = None) -> dict[str, Any]:
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static" if static else "dynamic",
              "ignored_layers": ignored_layers or []}
    return config | ({"weight_block_size": list(BLOCK)} if block else {})


def compressed_tensors_fp8_config(*, weights: str, static: bool, ignore: list[str]) -> dict[str, Any]:
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": weights, "dynamic": False}
    if weights == "block":
        w["block_structure"] = list(BLOCK)
    a = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token",
         "dynamic": not static}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                          "output_activations": None}}}


def make_fp8_checkpoints(family: str, quantization_config: dict[str, Any], packed: Path, plain: Path,
                         seed: int = 0, **overrides) -> dict[str, float]:
    """packed: the FP8 checkpoint; plain: the same model with every quantized weight dequantized (f32).
    Returns the static input scales written (module -> scale)."""
    make_checkpoint(family, plain, seed=seed, **(DIMS | overrides))
    tensors = load_file(plain / "model.safetensors")
    q = read_quantization({"quantization_config": quantization_config})
    rng = np.random.default_rng(seed)
    packed_tensors = {name: torch.from_numpy(value) for name, value in tensors.items()}
    input_scales = {}
    for name in list(tensors):
        module = name.removesuffix(".weight")
        if not module.endswith(PROJECTIONS) or not q.converts(module):
            continue
        w = tensors[name]  # [out, in]
        values, scale = _quantize(q.fp8.weight_scales, w)
        tensors[name] = dequantize(values, per_feature_scales(scale, *w.shape, q.fp8.weight_scales == "block", BLOCK))
        scale_name = "weight_scale_inv" if q.method == "fp8" and q.fp8.weight_scales == "block" else "weight_scale"
        packed_tensors[name] = torch.from_numpy(values.view(np.uint8)).view(torch.float8_e4m3fn)
        packed_tensors[f"{module}.{scale_name}"] = torch.from_numpy(np.asarray(scale, np.float32))
        if q.fp8.static_activations:
            input_scales[module] = float(rng.uniform(1.0, 3.0) / 448.0)
            packed_tensors[f"{module}.input_scale"] = torch.tensor(input_scales[module], dtype=torch.float32)
    save_file(tensors, plain / "model.safetensors")
    packed.mkdir(parents=True, exist_ok=True)
    save_torch_file({k: v.contiguous() for k, v in packed_tensors.items()}, packed / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    return input_scales


def _quantize(weight_scales: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if weight_scales == "block":
        return quantize_blocks(w, BLOCK)
    if weight_scales == "channel":
        return quantize_per_channel(w)
    values, scale = quantize_per_tensor(w)
    return values, scale.reshape(1)  # compressed-tensors and vLLM's fp8 store [1]
