"""The published int4 checkpoint layouts (AWQ GEMM, GPTQ, compressed-tensors pack-quantized): unpack,
dequantize, quantize-and-pack (for tests and dummy weights), and the conversion of each to the
kernel layout `Int4Weights` (common.py).

Every layout quantizes a Linear's weight per group of `group_size` consecutive input features and per
output feature: w = (q - z) * s, with q and z unsigned 4-bit codes (0..15) and s a float scale.

AWQ GEMM (AutoAWQ `WQLinear_GEMM`), input features as rows:
    qweight  int32 [in, out / 8]          word c holds columns 8c..8c+7, column 8c + AWQ_ORDER[i] in
                                          bits 4i..4i+3
    qzeros   int32 [in / group, out / 8]  packed the same way
    scales   fp16  [in / group, out]
GPTQ (AutoGPTQ / GPTQModel), `bits` 4 or 8, p = 32 / bits values per word:
    qweight  int32 [in / p, out]          word r holds input features pr..pr+p-1, feature pr + i in
                                          bits [bits * i, bits * (i + 1)) (packed along in)
    qzeros   int32 [groups, out / p]      packed along out, sequentially; checkpoint_format "gptq"
                                          (v1) stores z - 1, "gptq_v2" stores z
    scales   fp16  [groups, out]
    g_idx    int32 [in]                   the group of each input feature (desc_act permutes them)
  symmetric checkpoints imply z = 2^(bits - 1) (their qzeros, if present, are not read).
compressed-tensors pack-quantized (`pack_to_int32`), output features as rows, signed codes
q_s = q - 8 stored as q:
    weight_packed      int32 [out, in / 8]          word c holds input features 8c..8c+7 sequentially
    weight_scale       [out, in / group]            in the model's dtype
    weight_zero_point  int32 [out / 8, in / group]  optional (asymmetric): signed zero points z_s,
                                                    packed along out as the weights are along in
  w = (q_s - z_s) * s; symmetric: z_s = 0.

`dequantize_*` return float [in, out] (input features as rows, as `Int4Weights`), exactly: (q - z) * s
is computed in float32 (exact: a 5-bit integer times an fp16/bf16 scale) and rounded once to `dtype`.
Every function takes numpy arrays (load time) or jax arrays and returns the same kind.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels.int4_matmul.common import SIGNED_OFFSET, Int4Weights

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ word nibble i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column j is in nibble AWQ_REVERSE_ORDER[j]
GptqFormat = Literal["gptq", "gptq_v2"]


def _xp(x) -> Any:
    return jnp if isinstance(x, jax.Array) else np


# ----------------------------------------------------------------------------------------------
# Bit packing


def unpack_int32(packed, bits: int, axis: int):
    """int32 words -> their unsigned codes (int32), `32 / bits` per word, code i of a word from bits
    [bits * i, bits * (i + 1)), laid out consecutively along `axis` (whose length grows by 32 / bits)."""
    xp = _xp(packed)
    per_word = 32 // bits
    axis = axis % packed.ndim
    shifts = xp.arange(0, 32, bits, dtype=xp.int32)  # [per_word]
    words = xp.expand_dims(packed.astype(xp.int32), axis + 1)  # [..., W, 1, ...]
    shape = [1] * (packed.ndim + 1)
    shape[axis + 1] = per_word
    codes = (words >> shifts.reshape(shape)) & ((1 << bits) - 1)  # [..., W, per_word, ...]
    out_shape = list(packed.shape)
    out_shape[axis] *= per_word
    return codes.reshape(out_shape)


def pack_int32(codes, bits: int, axis: int):
    """The inverse of `unpack_int32`: unsigned codes (< 2^bits) -> int32 words along `axis`."""
    xp = _xp(codes)
    per_word = 32 // bits
    axis = axis % codes.ndim
    if codes.shape[axis] % per_word:
        raise ValueError(f"axis {axis} of {codes.shape} is not a multiple of {per_word}")
    grouped_shape = list(codes.shape)
    grouped_shape[axis : axis + 1] = [codes.shape[axis] // per_word, per_word]
    grouped = codes.astype(xp.uint32).reshape(grouped_shape)
    shape = [1] * len(grouped_shape)
    shape[axis + 1] = per_word
    shifted = grouped << (xp.arange(0, 32, bits, dtype=xp.uint32).reshape(shape))
    # The codes occupy disjoint bits, so their sum is their bitwise or.
    words = shifted.sum(axis=axis + 1, dtype=xp.uint32)
    return words.view(xp.int32) if xp is np else jax.lax.bitcast_convert_type(words, jnp.int32)


def _awq_columns(codes, reverse: bool):
    """Reorders the last axis within each run of 8: packed AWQ order <-> natural column order."""
    xp = _xp(codes)
    order = AWQ_REVERSE_ORDER if reverse else AWQ_ORDER
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    return xp.take(grouped, xp.asarray(order), axis=-1).reshape(codes.shape)


def _expand_groups(per_group, group_size: int, axis: int = 0):
    """[..., G, ...] -> [..., G * group_size, ...]: each group's row repeated for its features."""
    return _xp(per_group).repeat(per_group, group_size, axis=axis)


def _dequantize(codes, zeros, scales, dtype):
    xp = _xp(codes)
    return ((codes.astype(xp.float32) - zeros.astype(xp.float32)) * scales.astype(xp.float32)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# AWQ GEMM


def unpack_awq(qweight, qzeros):
    """-> (codes int32 [in, out], zeros int32 [groups, out]), columns in natural order."""
    return (
        _awq_columns(unpack_int32(qweight, 4, axis=1), reverse=True),
        _awq_columns(unpack_int32(qzeros, 4, axis=1), reverse=True),
    )


def dequantize_awq(qweight, qzeros, scales, group_size: int, dtype=np.float32):
    """AWQ GEMM tensors -> w [in, out] in `dtype`."""
    codes, zeros = unpack_awq(qweight, qzeros)
    return _dequantize(codes, _expand_groups(zeros, group_size), _expand_groups(scales, group_size), dtype)


def pack_awq(codes, zeros):
    """(codes [in, out], zeros [groups, out], unsigned) -> (qweight, qzeros) int32."""
    return pack_int32(_awq_columns(codes, reverse=False), 4, axis=1), pack_int32(
        _awq_columns(zeros, reverse=False), 4, axis=1
    )


def awq_to_int4(qweight, qzeros, scales, group_size: int, scale_dtype=jnp.bfloat16) -> Int4Weights:
    codes, zeros = unpack_awq(qweight, qzeros)
    return _int4_weights(codes, zeros, scales, group_size, scale_dtype)


# ----------------------------------------------------------------------------------------------
# GPTQ


def unpack_gptq(qweight, qzeros, g_idx=None, *, bits: int = 4, group_size: int, sym: bool,
                checkpoint_format: GptqFormat = "gptq"):
    """-> (codes int32 [in, out], zeros int32 [groups, out], g_idx int32 [in]). Symmetric: zeros all
    2^(bits - 1). v1 ("gptq") stores z - 1: the zero read is the stored code + 1 (1..16), as vLLM's
    and exllama's kernels read it."""
    xp = _xp(qweight)
    codes = unpack_int32(qweight, bits, axis=0)  # [in, out]
    num_features, out = codes.shape
    if g_idx is None:
        g_idx = xp.arange(num_features, dtype=xp.int32) // group_size
    num_groups = -(-num_features // group_size)
    if sym:
        zeros = xp.full((num_groups, out), 1 << (bits - 1), xp.int32)
    else:
        zeros = unpack_int32(qzeros, bits, axis=1)  # [groups, out]
        if checkpoint_format == "gptq":
            zeros = zeros + 1
        elif checkpoint_format != "gptq_v2":
            raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r} (gptq, gptq_v2)")
    return codes, zeros, g_idx.astype(xp.int32)


def dequantize_gptq(qweight, qzeros, scales, g_idx=None, *, bits: int = 4, group_size: int, sym: bool,
                    checkpoint_format: GptqFormat = "gptq", dtype=np.float32):
    """GPTQ tensors -> w [in, out] in `dtype`: feature i uses group g_idx[i]'s zeros and scales."""
    codes, zeros, g_idx = unpack_gptq(qweight, qzeros, g_idx, bits=bits, group_size=group_size, sym=sym,
                                      checkpoint_format=checkpoint_format)
    return _dequantize(codes, zeros[g_idx], scales[g_idx], dtype)


def pack_gptq(codes, zeros, *, bits: int = 4, checkpoint_format: GptqFormat = "gptq"):
    """(codes [in, out], zeros [groups, out], unsigned) -> (qweight, qzeros) int32. v1 cannot store a
    zero point of 0 (its z - 1 is -1)."""
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise ValueError("GPTQ v1 (z - 1 stored) cannot hold a zero point of 0: use gptq_v2")
        zeros = zeros - 1
    return pack_int32(codes, bits, axis=0), pack_int32(zeros, bits, axis=1)


def gptq_to_int4(qweight, qzeros, scales, g_idx=None, *, group_size: int, sym: bool,
                 checkpoint_format: GptqFormat = "gptq", scale_dtype=jnp.bfloat16) -> Int4Weights:
    """4-bit GPTQ -> `Int4Weights`. A desc_act g_idx (features not in group order) becomes
    `input_perm`: the features sorted by group (stable), so that each group's features are
    consecutive rows; every group must then hold exactly `group_size` features."""
    codes, zeros, g_idx = unpack_gptq(qweight, qzeros, g_idx, bits=4, group_size=group_size, sym=sym,
                                      checkpoint_format=checkpoint_format)
    xp = _xp(codes)
    in_order = xp.arange(codes.shape[0], dtype=xp.int32) // group_size
    if bool((g_idx == in_order).all()):
        return _int4_weights(codes, None if sym else zeros, scales, group_size, scale_dtype)
    perm = xp.argsort(g_idx, stable=True).astype(xp.int32)
    if not bool((g_idx[perm] == in_order).all()):
        raise ValueError(f"g_idx does not give every group exactly {group_size} input features")
    weights = _int4_weights(codes[perm], None if sym else zeros, scales, group_size, scale_dtype)
    return Int4Weights(weights.values, weights.scales, weights.zeros, perm, group_size)


# ----------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def unpack_pack_quantized(weight_packed, weight_zero_point=None, *, num_groups: int):
    """-> (signed codes int32 [out, in], signed zeros int32 [out, groups] (0 when symmetric))."""
    xp = _xp(weight_packed)
    codes = unpack_int32(weight_packed, 4, axis=1) - SIGNED_OFFSET  # [out, in]
    if weight_zero_point is None:
        zeros = xp.zeros((codes.shape[0], num_groups), xp.int32)
    else:
        zeros = unpack_int32(weight_zero_point, 4, axis=0) - SIGNED_OFFSET  # [out, groups]
    return codes, zeros


def dequantize_pack_quantized(weight_packed, weight_scale, weight_zero_point=None, *, group_size: int,
                              dtype=np.float32):
    """compressed-tensors pack-quantized tensors -> w [in, out] in `dtype` (the transpose of the
    Linear's [out, in] weight)."""
    codes, zeros = unpack_pack_quantized(weight_packed, weight_zero_point, num_groups=weight_scale.shape[1])
    w = _dequantize(codes, _expand_groups(zeros, group_size, axis=1), _expand_groups(weight_scale, group_size, 1),
                    dtype)  # [out, in]
    return w.T


def pack_pack_quantized(codes, zeros=None):
    """(signed codes [out, in], signed zeros [out, groups] or None) -> (weight_packed,
    weight_zero_point or None) int32."""
    packed = pack_int32(codes + SIGNED_OFFSET, 4, axis=1)
    return packed, None if zeros is None else pack_int32(zeros + SIGNED_OFFSET, 4, axis=0)


def pack_quantized_to_int4(weight_packed, weight_scale, weight_zero_point=None, *, group_size: int,
                           scale_dtype=jnp.bfloat16) -> Int4Weights:
    codes, zeros = unpack_pack_quantized(weight_packed, weight_zero_point, num_groups=weight_scale.shape[1])
    zeros = None if weight_zero_point is None else zeros.T + SIGNED_OFFSET
    return _int4_weights(codes.T + SIGNED_OFFSET, zeros, weight_scale.T, group_size, scale_dtype)


# ----------------------------------------------------------------------------------------------
# To the kernel layout


def _int4_weights(codes, zeros, scales, group_size: int, scale_dtype) -> Int4Weights:
    """Unsigned codes [K, N], unsigned zeros [K / group, N] (None: 8), scales [K / group, N] ->
    `Int4Weights` (values q - 8 as int4, zeros z - 8 and scales in scale_dtype; exact except for the
    rounding of the scales to scale_dtype)."""
    xp = _xp(codes)
    int4 = jnp.int4 if xp is jnp else ml_dtypes.int4
    values = (codes - SIGNED_OFFSET).astype(xp.int8).astype(int4)
    zeros = None if zeros is None else (zeros - SIGNED_OFFSET).astype(scale_dtype)
    return Int4Weights(values, scales.astype(scale_dtype), zeros, None, group_size)


# ----------------------------------------------------------------------------------------------
# Quantizing float weights (tests, dummy weights)


def quantize_groups(w, group_size: int, *, sym: bool, bits: int = 4, scale_dtype=np.float16):
    """Round-to-nearest quantization of w [in, out] per group of input features.

    -> (codes int32 [in, out] unsigned, zeros int32 [groups, out] unsigned, scales [groups, out] in
    scale_dtype). Asymmetric: s = (max - min) / (2^bits - 1), z = round(-min / s); symmetric:
    s = max|w| / (2^(bits-1) - 1), z = 2^(bits - 1). Not any particular quantizer's (no GPTQ error
    feedback, no AWQ search): a valid checkpoint of each layout, for tests.
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if k % group_size:
        raise ValueError(f"{k} input features are not a multiple of group_size {group_size}")
    top = (1 << bits) - 1
    grouped = w.reshape(k // group_size, group_size, n)
    if sym:
        zero = 1 << (bits - 1)
        scales = (np.abs(grouped).max(1) / (zero - 1)).astype(scale_dtype)
        zeros = np.full(scales.shape, zero, np.int32)
    else:
        lo, hi = np.minimum(grouped.min(1), 0), np.maximum(grouped.max(1), 0)
        scales = ((hi - lo) / top).astype(scale_dtype)
        zeros = np.clip(np.round(-lo / np.maximum(scales.astype(np.float32), 1e-10)), 0, top).astype(np.int32)
    s = np.maximum(scales.astype(np.float32), 1e-10)[:, None, :]
    codes = np.clip(np.round(grouped / s) + zeros[:, None, :], 0, top).astype(np.int32)
    return codes.reshape(k, n), zeros, scales
