"""FP8 checkpoint weights in numpy: quantizing a float weight [out, in] as each format stores it
(per tensor, per output channel, per 128 x 128 block; `fp8` and compressed-tensors' float-quantized
checkpoints, and `--quantization fp8` at load), and a stored scale turned into `Fp8Weights.scales`'
per-output-feature layout [out, Kg]."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from pallas_kernels.fp8_matmul.common import E4M3_MAX

E4M3 = ml_dtypes.float8_e4m3fn


def _quantize(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(w.astype(np.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _scale(amax: np.ndarray) -> np.ndarray:
    """amax / 448, an all-zero tensor's scale 1 (its codes are zeros either way)."""
    return np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)


def quantize_per_tensor(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 [out, in], f32 scale [])."""
    scale = _scale(np.abs(w.astype(np.float32)).max())
    return _quantize(w, scale), scale


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 [out, in], f32 scales [out, 1])."""
    scale = _scale(np.abs(w.astype(np.float32)).max(axis=1, keepdims=True))
    return _quantize(w, scale), scale


def quantize_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] (multiples of the block) -> (e4m3 [out, in], f32 scales [out / bo, in / bi]: DeepSeek-V3's
    `weight_scale_inv`, by which the codes are multiplied)."""
    (out, k), (bo, bi) = w.shape, block
    blocks = w.astype(np.float32).reshape(out // bo, bo, k // bi, bi)
    scale = _scale(np.abs(blocks).max(axis=(1, 3)))  # [out / bo, in / bi]
    return _quantize(blocks, scale[:, None, :, None]).reshape(out, k), scale


def per_feature_scales(scale: np.ndarray, out: int, k: int, blocked: bool, block: tuple[int, int]) -> np.ndarray:
    """A stored scale ([] or [1]: per tensor; [out, 1]: per channel; [out / bo, in / bi] with `blocked`)
    -> f32 [out, Kg] (Kg = 1, or in / bi)."""
    scale = np.asarray(scale, np.float32)
    if not blocked:
        return np.ascontiguousarray(np.broadcast_to(scale.reshape(-1, 1), (out, 1)))
    (bo, bi) = block
    if out % bo or k % bi or scale.shape != (out // bo, k // bi):
        raise ValueError(f"block scales {scale.shape} do not tile a [{out}, {k}] weight in {bo} x {bi} blocks")
    return np.repeat(scale, bo, axis=0)  # [out, in / bi]


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """e4m3 [out, in] with f32 scales [out, Kg] -> f32 [out, in]."""
    out, k = values.shape
    groups = scales.shape[1]
    return (values.astype(np.float32).reshape(out, groups, k // groups) * scales[..., None]).reshape(out, k)
