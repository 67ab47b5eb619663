"""The device-side batch: one flat, ragged step of query tokens, padded to a bucket.

A registered pytree dataclass; every field is a data (traced) array, so a new batch of the same
bucket shape never recompiles. The shapes are the bucket: T tokens, S request slots, P pages
per request slot, R sampled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax


@jax.tree_util.register_dataclass
@dataclass
class ForwardBatch:
    input_ids: jax.Array  # [T] i32; padded tokens are 0
    positions: jax.Array  # [T] i32 absolute position of each token in its request
    slot_mapping: jax.Array  # [T] i32 page * page_size + offset where its K/V goes; padding: out of range
    cu_q_lens: jax.Array  # [S + 1] i32 request s owns tokens cu_q_lens[s]:cu_q_lens[s+1]
    kv_lens: jax.Array  # [S] i32 KV length of each request after this step
    page_indices: jax.Array  # [S, P] i32 each request's pages, in order
    num_seqs: jax.Array  # [1] i32 live request slots
    logits_indices: jax.Array  # [R] i32 tokens whose logits are wanted (one per sampled request)

    def num_real_tokens(self) -> jax.Array:
        """[] i32: the tokens of live requests; the rest of T is the bucket's padding."""
        return self.cu_q_lens[self.num_seqs[0]]
