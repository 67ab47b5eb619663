"""The packed allowed-token bitmask: int32 words, bit j of word i set = token 32 * i + j allowed.

This is the layout of `SchedulerOutput.grammar_bitmask` rows and of the runner's on-device mask
(`jaxllm/runner/sampler.py`); `apply_bitmask_numpy` is the reference the device version is tested against.
"""

from __future__ import annotations

import numpy as np


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words in one request's bitmask."""
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bitmask [..., W] int32 -> allowed [..., vocab_size] bool."""
    if bitmask.shape[-1] * 32 < vocab_size:
        raise ValueError(f"bitmask has {bitmask.shape[-1]} words, too few for a vocabulary of {vocab_size}")
    words = np.ascontiguousarray(bitmask, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")  # [..., W * 32]
    return bits[..., :vocab_size].astype(bool)


def apply_bitmask_numpy(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """logits [R, V] float32, bitmask [R, W] int32 -> logits [R, V] with disallowed tokens at -inf.

    Returns a new array. A row of all ones (-1 words) leaves its logits unchanged.
    """
    if logits.ndim != 2 or bitmask.ndim != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"expected logits [R, V] and bitmask [R, W], got {logits.shape} and {bitmask.shape}")
    allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, V]
    return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)


def allowed_token_ids(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """bitmask_row [W] int32 -> the allowed token ids [K] int64, ascending."""
    return np.flatnonzero(unpack_bitmask(bitmask_row, vocab_size))
