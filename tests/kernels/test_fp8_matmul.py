"""FP8 W8A8 matmul: the XLA path (XLA's FP8 dot) against the reference (float32 fake quantization),
the reference against numpy, and the CUDA lowering keeping e4m3 operands on the dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import Fp8Weights, fp8_matmul_reference, fp8_matmul_xla
from pallas_kernels.fp8_matmul.formats import (
    dequantize,
    per_feature_scales,
    quantize_blocks,
    quantize_per_channel,
    quantize_per_tensor,
)

BLOCK = (128, 128)


def _weights(scheme: str, static: bool, n_shape=(2, 3, 128), k: int = 256,
             seed: int = 0) -> tuple[Fp8Weights, np.ndarray]:
    """Random weights [*N, K] quantized by `scheme`, and their dequantized float32 values [N, K]."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(n_shape))
    w = rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 2.0, size=(n, 1)).astype(np.float32)
    quantize = {"tensor": quantize_per_tensor, "channel": quantize_per_channel,
                "block": lambda w: quantize_blocks(w, BLOCK)}[scheme]
    values, scale = quantize(w)
    scales = per_feature_scales(scale, n, k, scheme == "block", BLOCK)  # [N, Kg]
    input_scale = jnp.float32(0.02) if static else None
    fp8 = Fp8Weights(jnp.asarray(values).reshape(*n_shape, k), jnp.asarray(scales).reshape(*n_shape, -1),
                     input_scale)
    return fp8, dequantize(values, scales)


@pytest.mark.parametrize(("scheme", "static"), [("tensor", True), ("tensor", False), ("channel", False),
                                                ("block", False)])
def test_xla_path_matches_the_reference(scheme, static):
    w, _ = _weights(scheme, static)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(24, 256)), jnp.float32)
    x = x.at[3].set(0.0)  # a zero row: dynamic scales take their floor
    ref = fp8_matmul_reference(x, w)
    out = jax.jit(fp8_matmul_xla)(x, w)
    assert out.shape == (24, 2, 3, 128)
    # Float32 rounding apart (the scales applied after the dot, not before): 1e-3 on outputs up to ~40.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("static", [True, False])
def test_reference_is_fake_quantization(static):
    """The reference equals numpy on the dequantized weights times the activations rounded to e4m3."""
    w, w_float = _weights("channel", static, n_shape=(128,))
    x = np.random.default_rng(2).normal(size=(8, 256)).astype(np.float32)
    scale = 0.02 if static else np.abs(x).max(axis=1, keepdims=True) / 448.0
    x_fake = np.clip(x / scale, -448, 448).astype(jnp.float8_e4m3fn).astype(np.float32) * scale
    np.testing.assert_allclose(fp8_matmul_reference(jnp.asarray(x), w), x_fake @ w_float.T, rtol=1e-5, atol=1e-4)


def test_block_scales_use_one_activation_scale_per_128_inputs():
    w, w_float = _weights("block", False, n_shape=(128,))
    x = np.random.default_rng(3).normal(size=(4, 256)).astype(np.float32)
    x[:, :128] *= 100.0  # a per-token scale would flush the small half
    xg = x.reshape(4, 2, 128)
    scale = np.abs(xg).max(axis=2, keepdims=True) / 448.0
    x_fake = (np.clip(xg / scale, -448, 448).astype(jnp.float8_e4m3fn).astype(np.float32) * scale).reshape(4, 256)
    np.testing.assert_allclose(fp8_matmul_xla(jnp.asarray(x), w), x_fake @ w_float.T, rtol=1e-4, atol=1e-3)


def test_bf16_activations():
    """A bf16 model's FP8 dot gives bf16: the reference's result to bf16 rounding."""
    w, _ = _weights("channel", False)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(16, 256)), jnp.bfloat16)
    out = fp8_matmul_xla(x, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), fp8_matmul_reference(x, w).astype(np.float32), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize(("scheme", "result"), [("tensor", "bf16"), ("block", "f32")])
def test_cuda_lowering_keeps_e4m3_operands_on_the_dot(scheme, result):
    """What XLA's GPU compiler gets: one dot_general on e4m3 operands (cuBLASLt's FP8 GEMM), giving bf16 (float32
    partial sums under block scales)."""
    w, _ = _weights(scheme, False)
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    text = jax.jit(fp8_matmul_xla).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1 and dots[0].count("f8E4M3FN>") == 2 and f"x{result}>" in dots[0].split("->")[-1]
