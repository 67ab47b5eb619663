"""A step's host arrays onto the device: one packed transfer, unpacked into buffers that stay put.

NOTE: XLA:GPU replays each compiled step as CUDA graphs (command buffers). A graph records the
addresses of its kernels' operands, so a step whose inputs sit in new buffers must update the
recorded graphs before it launches, and that update costs the host as much as the device's whole
step at small batches (`bench/dispatch_cost.py` measures it). So the inputs go over as one int32
array (one transfer costs several times less than a dozen small ones), and a small jit copies its
pieces into the previous step's buffers of the same shapes, donated: they come back at the same
addresses, and the forward's graphs replay as recorded.

A buffer handed to a step is donated by the next put of the same shapes; that is safe because
every step's work is enqueued in order on the device, and the runner keeps no reference to it.
The last buffers of every shape stay allocated: the runner counts them in its memory budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
from jax.sharding import Sharding

from jaxllm.models.batch import ForwardBatch

Buffers = tuple[jax.Array, ...]
Array = np.ndarray | jax.Array
D = TypeVar("D")


class ForwardInputs(NamedTuple):
    """The forward's inputs of one step, numpy on the host and jax arrays once put: T tokens, S
    request slots, P pages per slot, R rows whose logits are wanted (S; T for prompt logprobs)."""

    input_ids: Array  # [T] i32; padded tokens are 0
    positions: Array  # [T] i32 absolute position of each token in its request
    slot_mapping: Array  # [T] i32 where its K/V goes; padding: out of range (dropped)
    cu_q_lens: Array  # [S + 1] i32 request s owns tokens cu_q_lens[s]:cu_q_lens[s+1]
    kv_lens: Array  # [S] i32 KV length of each request after this step
    page_indices: Array  # [S, P] i32 each request's pages, in order
    num_seqs: Array  # [1] i32 live request slots
    logits_indices: Array  # [R] i32 tokens whose logits are wanted
    placeholder_rows: Array  # [T] i32; -1 = the input id is real, else its row in the previous step's tokens

    @classmethod
    def zeros(cls, num_tokens: int, num_slots: int, pages_per_seq: int) -> ForwardInputs:
        """Zeros shaped as a bucket's inputs (warm-up, abstract arguments, the memory budget)."""
        tokens, slots = np.zeros(num_tokens, np.int32), np.zeros(num_slots, np.int32)
        return cls(tokens, tokens, tokens, np.zeros(num_slots + 1, np.int32), slots,
                   np.zeros((num_slots, pages_per_seq), np.int32), np.zeros(1, np.int32), slots, tokens)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)

    def batch(self) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids, positions=self.positions, slot_mapping=self.slot_mapping,
            cu_q_lens=self.cu_q_lens, kv_lens=self.kv_lens, page_indices=self.page_indices,
            num_seqs=self.num_seqs, logits_indices=self.logits_indices,
        )


def split_tables(batch: D) -> tuple[D, dict[str, np.ndarray]]:
    """(a dataclass of numpy arrays with its per-row columns only, {field: [S, X] table}).

    NOTE: the sampler's tables stay out of the stable buffers: they feed only the sampler, whose
    dispatch is cheap, and one kept per bucket would hold gigabytes (token histories at long
    max_model_len)."""
    tables = {f.name: v for f in dataclasses.fields(batch) if (v := getattr(batch, f.name)) is not None and v.ndim > 1}
    return dataclasses.replace(batch, **dict.fromkeys(tables)), tables


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
