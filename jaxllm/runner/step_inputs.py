"""A step's host arrays onto the device: one packed transfer, unpacked into buffers that stay put.

NOTE: XLA:GPU replays each compiled step as CUDA graphs (command buffers). A graph records the
addresses of its kernels' operands, so a step whose inputs sit in new buffers must update the
recorded graphs before it launches. On an H200 (8B model, `bench/dispatch_cost.py`) that update
made the forward's dispatch cost 4.5-6.8 ms of host time against 1.6-2.4 ms with its inputs in the
buffers of the step before, as much as the device's whole step at small batches. So the inputs go
over as one int32 array (one transfer: ~0.1 ms, against 0.7-1.0 ms for a dozen small arrays),
and a small jit copies its pieces into the previous step's buffers of the same shapes, donated:
they come back at the same addresses, and the forward's graphs replay as recorded.

A buffer handed to a step is donated by the next put of the same shapes; that is safe because
every step's work is enqueued in order on the device, and the runner keeps no reference to it.
The last buffers of every shape stay allocated: the runner counts them in its memory budget.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

Buffers = tuple[jax.Array, ...]


def _unpack(previous: tuple[Buffers, ...], packed: jax.Array) -> tuple[Buffers, ...]:
    """packed [sum of sizes] i32 -> arrays shaped and typed as `previous` (whose buffers they take)."""
    out, offset = [], 0
    for group in previous:
        pieces = []
        for like in group:
            piece = packed[offset : offset + like.size]
            offset += like.size
            if like.dtype == np.bool_:
                piece = piece != 0
            elif like.dtype != piece.dtype:
                piece = jax.lax.bitcast_convert_type(piece, like.dtype)
            pieces.append(piece.reshape(like.shape))
        out.append(tuple(pieces))
    return tuple(out)


# NOTE: keep_unused, or jit drops the unread `previous` and the donation with it. One jit for every
# StableInputs, so one that warms a shape up (the runner's loader threads) compiles it for all.
_unpack_jit = jax.jit(_unpack, donate_argnums=(0,), keep_unused=True)


def _packable(leaf: np.ndarray) -> bool:
    return leaf.dtype.itemsize == 4 or leaf.dtype == np.bool_


def _as_int32(leaf: np.ndarray) -> np.ndarray:
    if leaf.dtype == np.bool_:
        return leaf.astype(np.int32).ravel()
    return np.ascontiguousarray(leaf).view(np.int32).ravel()


class StableInputs:
    """`put(*trees)` is `jax.device_put(trees, sharding)` for pytrees of numpy arrays (a tuple,
    one per tree), in one transfer, with each tree's result in the same device buffers as the
    previous put of a tree of its structure, shapes and dtypes."""

    def __init__(self, sharding: Sharding):
        self._sharding = sharding
        self._buffers: dict[Any, Buffers] = {}  # (treedef, shapes, dtypes) -> the last result

    def put(self, *trees: Any) -> tuple[Any, ...]:
        flat = [jax.tree.flatten(tree) for tree in trees]
        leaves_all = [leaf for leaves, _ in flat for leaf in leaves]
        if not leaves_all or not all(_packable(leaf) for leaf in leaves_all):  # e.g. float16: plain
            return jax.device_put(trees, self._sharding)
        keys = [(treedef, tuple((leaf.shape, leaf.dtype.str) for leaf in leaves)) for leaves, treedef in flat]
        previous = []
        for key, (leaves, _) in zip(keys, flat, strict=True):
            buffers = self._buffers.pop(key, None)
            if buffers is None:  # first put of these shapes
                buffers = tuple(jax.device_put([np.zeros_like(leaf) for leaf in leaves], self._sharding))
            previous.append(buffers)
        packed = np.concatenate([_as_int32(leaf) for leaf in leaves_all])
        results = _unpack_jit(tuple(previous), jax.device_put(packed, self._sharding))
        self._buffers.update(zip(keys, results, strict=True))
        return tuple(jax.tree.unflatten(treedef, result) for (_, treedef), result in zip(flat, results, strict=True))
