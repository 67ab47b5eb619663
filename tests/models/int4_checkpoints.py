"""Test helper: tiny random int4 checkpoints (AWQ GEMM, GPTQ, compressed-tensors pack-quantized), packed
in numpy from each published layout (pallas_kernels/int4_matmul/formats.py), each beside a float32
checkpoint of the same weights dequantized.

The transformers checkpoint (tests/models/hf_tiny.py) is written with dims that hold int4 groups of
128: hidden 128, intermediate 256, 4 query heads and 2 KV heads of 64 (q/o width 256).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxllm.model_arch import read_quantization
from pallas_kernels.int4_matmul.formats import (
    dequantize_awq,
    dequantize_gptq,
    dequantize_pack_quantized,
    pack_awq,
    pack_gptq,
    pack_pack_quantized,
    quantize_groups,
)
from tests.models.hf_tiny import make_checkpoint

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
GROUP = 128
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")


def awq_config(modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": modules_to_not_convert}


def gptq_config(*, desc_act: bool, sym: bool, checkpoint_format: str) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": checkpoint_format}


def compressed_tensors_config(*, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP,
               "actorder": None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}}}


def make_int4_checkpoints(family: str, quantization_config: dict[str, Any], packed: Path, plain: Path,
                          seed: int = 0, **overrides) -> None:
    """packed: the int4 checkpoint; plain: the same model with every quantized weight dequantized (f32).
    `overrides`: config fields beside DIMS."""
    make_checkpoint(family, plain, seed=seed, **(DIMS | overrides))
    tensors = load_file(plain / "model.safetensors")
    q = read_quantization({"quantization_config": quantization_config})
    rng = np.random.default_rng(seed)
    # desc_act: one feature order per input width, so that projections sharing an input share g_idx.
    orders = {k: rng.permutation(k) for k in (128, 256, 512)}
    packed_tensors = dict(tensors)
    for name in list(tensors):
        module = name.removesuffix(".weight")
        if not module.endswith(PROJECTIONS) or not q.converts(module):
            continue
        w = tensors.pop(name).T  # [in, out]
        packed_tensors.pop(name)
        order = orders[w.shape[0]] if q.desc_act else np.arange(w.shape[0])
        quantized, dequantized = _pack(q.method, quantization_config, w, order)
        packed_tensors |= {f"{module}.{t}": np.ascontiguousarray(v) for t, v in quantized.items()}
        tensors[name] = np.ascontiguousarray(dequantized.T)
    save_file(tensors, plain / "model.safetensors")
    packed.mkdir(parents=True, exist_ok=True)
    save_file(packed_tensors, packed / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))


def _pack(method: str, qc: dict[str, Any], w: np.ndarray,
          order: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """w [in, out] -> (the module's packed tensors, the weights they dequantize to [in, out])."""
    if method == "awq":
        codes, zeros, scales = quantize_groups(w, GROUP, sym=False)
        qweight, qzeros = pack_awq(codes, zeros)
        return ({"qweight": qweight, "qzeros": qzeros, "scales": scales},
                dequantize_awq(qweight, qzeros, scales, GROUP))
    if method == "gptq":
        sym, fmt = qc["sym"], qc["checkpoint_format"]
        sorted_codes, zeros, scales = quantize_groups(w[order], GROUP, sym=sym)  # rows grouped by g_idx
        codes = np.empty_like(sorted_codes)
        codes[order] = sorted_codes
        g_idx = np.empty(len(order), np.int32)
        g_idx[order] = np.arange(len(order)) // GROUP
        if fmt == "gptq":
            zeros = np.maximum(zeros, 1)  # v1 stores z - 1: no zero point of 0 (its quantizer clamps too)
        qweight, qzeros = pack_gptq(codes, zeros, checkpoint_format=fmt)
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        return tensors, dequantize_gptq(qweight, qzeros, scales, g_idx, group_size=GROUP, sym=sym,
                                        checkpoint_format=fmt)
    symmetric = qc["config_groups"]["group_0"]["weights"]["symmetric"]
    codes, zeros, scales = quantize_groups(w, GROUP, sym=symmetric)
    signed_zeros = None if symmetric else (zeros - 8).T
    weight_packed, weight_zero_point = pack_pack_quantized((codes - 8).T, signed_zeros)
    tensors = {"weight_packed": weight_packed, "weight_scale": scales.T,
               "weight_shape": np.array(w.shape[::-1], np.int64)}
    if weight_zero_point is not None:
        tensors["weight_zero_point"] = weight_zero_point
    return tensors, dequantize_pack_quantized(weight_packed, scales.T, weight_zero_point, group_size=GROUP)
