"""Vectorised paged attention in plain XLA: gather each token's pages, attend with masks.

Serves on CPU and is the GPU fallback when the Pallas kernel does not fit the model.

NOTE: every query token gathers the pages of its own request ([Bq, L] keys per block of Bq
tokens), so a decode token reads its request's KV exactly once, while a prefill chunk of n
tokens reads it n times. Query blocks run one after another (`lax.map`) to bound the gathered
K/V to about `_GATHER_BUDGET` elements per KV head. The Pallas kernel removes both costs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import (
    AttentionParams,
    apply_soft_cap,
    attention_mask,
    token_metadata,
    validate_inputs,
)

# Gathered key positions (tokens x context) per query block.
_GATHER_BUDGET = 1 << 18


def _query_block(num_tokens: int, max_len: int) -> int:
    """Largest power-of-two block of tokens that divides T and keeps Bq * L under budget."""
    block = 1
    while block * 2 <= num_tokens and num_tokens % (block * 2) == 0 and block * 2 * max_len <= _GATHER_BUDGET:
        block *= 2
    return block


def ragged_paged_attention_xla(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    params: AttentionParams,
) -> jax.Array:  # [T, Hq, D]
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pages.shape[1], kv_pages.shape[3]
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    max_len = pages_per_seq * page_size

    slot, position, kv_len, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    block = _query_block(num_tokens, max_len)
    num_blocks = num_tokens // block
    key_pos = jnp.arange(max_len, dtype=jnp.int32)

    def attend(args):
        q_blk, slot_blk, pos_blk, len_blk, valid_blk = args  # q_blk [Bq, Hq, D]; rest [Bq]
        pages = page_indices[slot_blk]  # [Bq, P]
        k = kv_pages[0][:, pages].reshape(num_kv_heads, block, max_len, head_dim)  # [Hkv, Bq, L, D]
        v = kv_pages[1][:, pages].reshape(num_kv_heads, block, max_len, head_dim)
        qg = q_blk.reshape(block, num_kv_heads, group, head_dim)  # [Bq, Hkv, G, D]
        logits = jnp.einsum("bkgd,kbld->bkgl", qg, k, preferred_element_type=jnp.float32)
        logits = apply_soft_cap(logits * params.sm_scale, params.soft_cap)
        mask = attention_mask(pos_blk, len_blk, key_pos, params.sliding_window) & valid_blk[:, None]
        mask = mask[:, None, None, :]  # [Bq, 1, 1, L]
        logits = jnp.where(mask, logits, -jnp.inf)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
        weights = jnp.where(mask, jnp.exp(logits - peak), 0.0)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / jnp.where(denom > 0, denom, 1.0)
        out = jnp.einsum("bkgl,kbld->bkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.reshape(block, num_q_heads, head_dim).astype(q.dtype)

    def blocks(x):
        return x.reshape(num_blocks, block, *x.shape[1:])

    xs = (blocks(q), blocks(slot), blocks(position), blocks(kv_len), blocks(valid))
    if num_blocks == 1:
        out = attend(jax.tree.map(lambda x: x[0], xs))
    else:
        out = jax.lax.map(attend, xs).reshape(num_tokens, num_q_heads, head_dim)
    return out
