"""MXFP4 weights (gpt-oss's MoE experts): the OCP microscaling FP4 format, its checkpoint layout,
and the packed layout the grouped matmul reads.

Format: each value is an e2m1 nibble (sign, 2 exponent bits, 1 mantissa bit: +-{0, 0.5, 1, 1.5,
2, 3, 4, 6}); each run of 32 consecutive input features shares one e8m0 scale byte s, worth
2^(s - 127).

Checkpoint layout (per MoE layer, rows are output features, [out, in] per expert):
    *_blocks  uint8 [E, N, K / 32, 16]  byte i of a block: value 2i in the low nibble, 2i + 1 high
    *_scales  uint8 [E, N, K / 32]
gpt-oss: gate_up_proj N = 2I (gate and up interleaved: even rows gate, odd rows up), K = H;
down_proj N = H, K = I.

Kernel layout (`Mxfp4Weights`, in -> out like the dense rhs [E, K, N], N contiguous):
    blocks  uint8 [E, Kp / 2, N]  Kp = K rounded up to 128; within each chunk of 128 input
                                  features, byte row j (0..63) holds feature j in its low nibble
                                  and feature j + 64 in its high nibble (padding features: code 0)
    scales  uint8 [E, K / 32, N]
so the kernel's 64-deep K steps 2c and 2c + 1 read the same 64 byte rows (a register tile has at
least 64 rows), the low nibbles then the high ones. `pack_for_kernel` converts at load; it is local
to each output row and each 128-chunk of K, so a tensor-parallel shard of N, or of K at multiples
of 128, converts alone to the same bytes as that shard of the whole tensor's conversion (a shard
of K at other multiples of 32 converts alone too, padding its own last chunk).

Every function here takes numpy arrays (load time, host) or jax arrays (device) and returns the
same kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values per scale
KERNEL_CHUNK = 128  # input features per packed chunk of the kernel layout: 64 byte rows
KERNEL_STEP = 64  # input features per K step of the kernel (one nibble of a chunk's bytes)
SCALE_BIAS = 127
# The 16 e2m1 codes as values (bit 3 is the sign), transformers' FP4_VALUES.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
E2M1_MAX = 6.0
# Every byte's two values (low nibble first): [256, 2] float32, one gather per byte.
BYTE_VALUES = np.stack([E2M1_VALUES[np.arange(256) & 0xF], E2M1_VALUES[np.arange(256) >> 4]], axis=-1)


def _xp(x) -> Any:
    """The array namespace of x: jax.numpy for jax arrays (traced too), else numpy."""
    return jnp if isinstance(x, jax.Array) else np


def scale_values(scales):
    """e8m0 bytes [...] -> float32 2^(s - 127), exactly (s = 0 is the subnormal 2^-127; s = 255, NaN
    in the spec, is inf as in transformers)."""
    xp = _xp(scales)
    s = scales.astype(xp.uint32)
    bits = xp.where(s == 0, xp.uint32(1 << 22), s << 23)  # f32 exponent field s: 2^(s - 127)
    if xp is np:
        return bits.view(np.float32)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nibbles(blocks):
    """uint8 [..., B] -> (low, high) codes, each uint8 [..., B]."""
    return blocks & 0x0F, blocks >> 4


def dequantize_mxfp4(blocks, scales, dtype=jnp.bfloat16):
    """Checkpoint layout -> weights [..., N, K] (rows are output features).

    blocks uint8 [..., N, K / 32, 16], scales uint8 [..., N, K / 32]. As transformers'
    `convert_moe_packed_tensors`: code value (exact in f32) times the scale, rounded once to
    `dtype` (transformers returns the transpose of the last two axes: [E, K, N]).
    """
    xp = _xp(blocks)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"blocks {blocks.shape} and scales {scales.shape} are not [..., K/32, 16] and [..., K/32]")
    out_shape = (*scales.shape[:-1], scales.shape[-1] * BLOCK)
    if xp is np and blocks.ndim > 3:
        # NOTE: one leading slice (an expert) at a time on the host: the float32 temporary of a
        # whole layer would be 4 bytes a weight.
        out = np.empty(out_shape, dtype)
        for i in range(blocks.shape[0]):
            out[i] = dequantize_mxfp4(blocks[i], scales[i], dtype)
        return out
    values = xp.asarray(BYTE_VALUES)[blocks].reshape(*scales.shape, BLOCK)  # [..., K/32, 32] f32
    return (values * scale_values(scales)[..., None]).reshape(out_shape).astype(dtype)


def quantize_mxfp4(w):
    """Weights [..., N, K] (rows are output features, K % 32 == 0) -> checkpoint (blocks, scales).

    Per block of 32: the scale is the smallest power of two that brings the block's largest
    magnitude to <= 6 (e2m1's largest), then each value is rounded to the nearest e2m1 value
    (ties to the even code). For tests and dummy weights; not bit-equal to any particular trainer's.
    """
    xp = _xp(w)
    *lead, k = w.shape
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    w = w.astype(xp.float32).reshape(*lead, k // BLOCK, BLOCK)  # [..., K/32, 32]
    amax = xp.max(xp.abs(w), axis=-1)  # [..., K/32]
    exponent = xp.ceil(xp.log2(xp.maximum(amax, 1e-30) / E2M1_MAX))
    scales = xp.clip(exponent + SCALE_BIAS, 0, 254).astype(xp.uint8)  # [..., K/32]
    scaled = w / scale_values(scales)[..., None]  # [..., K/32, 32], |x| <= 6 up to rounding
    magnitudes = xp.asarray(E2M1_VALUES[:8])
    distance = xp.abs(xp.abs(scaled)[..., None] - magnitudes)  # [..., K/32, 32, 8]
    # argmin takes the first of equal distances, i.e. the even code on a tie (codes alternate even/odd).
    code = xp.argmin(distance, axis=-1).astype(xp.uint8) | ((scaled < 0).astype(xp.uint8) << 3)
    code = code.reshape(*lead, k // BLOCK, BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)  # [..., K/32, 16]
    return blocks.astype(xp.uint8), scales


def deinterleave_rows(x, axis: int):
    """gpt-oss's fused gate_up rows (gate even, up odd) along `axis` -> [gate rows, up rows], the
    split layout the grouped matmul's activation takes. For blocks, scales (axis 1) and biases
    (axis -1) alike."""
    xp = _xp(x)
    n = x.shape[axis]
    order = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
    return xp.take(x, xp.asarray(order), axis=axis)


def padded_features(k: int) -> int:
    """K rounded up to the kernel layout's chunk."""
    return -(-k // KERNEL_CHUNK) * KERNEL_CHUNK


def pack_for_kernel(blocks, scales):
    """Checkpoint layout -> kernel layout, for `Mxfp4Weights`.

    blocks uint8 [E, N, K / 32, 16], scales uint8 [E, N, K / 32] -> (blocks uint8 [E, Kp / 2, N],
    scales uint8 [E, K / 32, N]). Pure byte shuffling, no rounding.
    """
    xp = _xp(blocks)
    e, n, num_blocks, half = blocks.shape
    k = num_blocks * BLOCK
    if half != BLOCK // 2 or scales.shape != (e, n, num_blocks):
        raise ValueError(f"blocks {blocks.shape} / scales {scales.shape}: not [E, N, K/32, 16] / [E, N, K/32]")
    kp = padded_features(k)
    low, high = _nibbles(blocks)
    codes = xp.stack([low, high], axis=-1).reshape(e, n, k)  # [E, N, K]: one code per byte
    codes = xp.pad(codes, ((0, 0), (0, 0), (0, kp - k)))  # [E, N, Kp]
    codes = codes.reshape(e, n, kp // KERNEL_CHUNK, 2, KERNEL_CHUNK // 2)  # [E, N, chunk, nibble, 64]
    packed = codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)  # [E, N, Kp/128, 64]
    packed = packed.reshape(e, n, kp // 2).transpose(0, 2, 1)  # [E, Kp/2, N]
    return _contiguous(packed), _contiguous(scales.transpose(0, 2, 1))


def _contiguous(x):
    """numpy arrays made C-contiguous (what safetensors and device_put want); jax arrays as they are."""
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Weights:
    """One MXFP4 weight matrix per expert in the kernel layout: the grouped matmul's rhs [E, K, N].

    For tensor parallelism shard N (gate_up: reshape N = [2, I] first, split layout) or K
    (down_proj's I: see `pack_for_kernel`).
    """

    blocks: jax.Array  # uint8 [E, Kp / 2, N]
    scales: jax.Array  # uint8 [E, K / 32, N]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, K, N), as the dense rhs it stands for."""
        e, num_blocks, n = self.scales.shape
        return e, num_blocks * BLOCK, n

    @property
    def ndim(self) -> int:
        return 3

    def validate(self) -> None:
        e, k, n = self.shape
        if self.blocks.dtype != jnp.uint8 or self.scales.dtype != jnp.uint8:
            raise ValueError(f"MXFP4 blocks and scales must be uint8, got {self.blocks.dtype}, {self.scales.dtype}")
        if self.blocks.shape != (e, padded_features(k) // 2, n):
            raise ValueError(f"MXFP4 blocks {self.blocks.shape} / scales {self.scales.shape} are not "
                             f"[E, Kp/2, N] / [E, K/32, N] (Kp: K rounded up to {KERNEL_CHUNK})")

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """[E, K, N] in `dtype` (the same rounding as `dequantize_mxfp4`)."""
        return dequantize_kernel_layout(self.blocks, self.scales, dtype)


def dequantize_kernel_layout(blocks, scales, dtype=jnp.bfloat16):
    """Kernel layout blocks uint8 [..., Kp / 2, N], scales uint8 [..., K / 32, N] -> [..., K, N]."""
    xp = _xp(blocks)
    *lead, half_kp, n = blocks.shape
    num_blocks = scales.shape[-2]
    k = num_blocks * BLOCK
    table = xp.asarray(E2M1_VALUES)
    low, high = _nibbles(blocks.reshape(*lead, half_kp // KERNEL_STEP, KERNEL_STEP, n))  # [..., Kp/128, 64, N]
    codes = xp.stack([low, high], axis=-3).reshape(*lead, 2 * half_kp, n)[..., :k, :]  # [..., K, N]
    values = table[codes.astype(xp.int32)].reshape(*lead, num_blocks, BLOCK, n)  # [..., K/32, 32, N] f32
    values = values * scale_values(scales)[..., None, :]
    return values.reshape(*lead, k, n).astype(dtype)
