"""The ragged paged batch metadata both attention kernels' tests draw (the contract of
pallas_kernels/ragged_paged_attention/common.py)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class RaggedLayout:
    num_tokens: int  # T, padded tokens past the last request's included
    num_pages: int  # the pool's pages: every slot's, and a few unused
    kv_lens: jax.Array  # [S] i32
    page_indices: jax.Array  # [S, P] i32: distinct, scattered ids in the pool
    cu_q_lens: jax.Array  # [S + 1] i32
    num_seqs: jax.Array  # [1] i32


def ragged_layout(rng: np.random.Generator, q_lens: tuple[int, ...], kv_lens: tuple[int, ...], *,
                  num_slots: int | None, num_tokens: int | None, pages_per_seq: int) -> RaggedLayout:
    """Live requests with these query and KV lengths, then padded slots (q_len 0) up to num_slots."""
    live = len(q_lens)
    num_slots = num_slots or live
    q = list(q_lens) + [0] * (num_slots - live)
    kv = list(kv_lens) + [0] * (num_slots - live)
    cu_q_lens = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    num_pages = num_slots * pages_per_seq + 3
    page_indices = rng.permutation(num_pages)[: num_slots * pages_per_seq].reshape(num_slots, -1)
    return RaggedLayout(num_tokens or int(cu_q_lens[-1]), num_pages, jnp.asarray(kv, jnp.int32),
                        jnp.asarray(page_indices, jnp.int32), jnp.asarray(cu_q_lens, jnp.int32),
                        jnp.asarray([live], jnp.int32))
