"""Vectorised paged attention in plain XLA: gather pages, attend with masks.

Serves on CPU and is the GPU fallback when the Pallas kernel does not fit the model.

Two loops, each with a data-dependent trip count, so a step pays for its real work only:

- decode run: the leading requests with one query token each (the runner orders decodes
  first). Blocks of `Bd` tokens; each token gathers its own request's pages, so every
  request's KV is read once.
- tiles: every other request, cut into tiles of `Bq` query tokens of one request; a tile gathers
  that request's pages once and attends all its tokens to them.

NOTE: requests are correct in any order; decodes placed after a prefill are merely handled as
one-token tiles. Gathered K/V per iteration are bounded by `_GATHER_BUDGET` key positions.
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

_GATHER_BUDGET = 1 << 18  # key positions gathered per decode block (tokens x context)
_TILE_TOKENS = 256  # query tokens per tile, at most


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _softmax_attend(q, k, v, mask, params: AttentionParams):
    """q [B, Hkv, M, D]; k, v [B, Hkv, L, D]; mask broadcastable to [B, Hkv, M, L] -> [B, Hkv, M, D] f32."""
    logits = jnp.einsum("bkmd,bkld->bkml", q, k, preferred_element_type=jnp.float32)
    logits = apply_soft_cap(logits * params.sm_scale, params.soft_cap)
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bkml,bkld->bkmd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)


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
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    )
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pages.shape[1], kv_pages.shape[3]
    group = num_q_heads // num_kv_heads
    num_slots, pages_per_seq = page_indices.shape
    max_len = pages_per_seq * page_size
    key_pos = jnp.arange(max_len, dtype=jnp.int32)
    live = num_seqs[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]

    def gather(pages):  # pages [..., P] -> [..., Hkv, L, D] for K and V
        k = jnp.moveaxis(kv_pages[0][:, pages], 0, -4)
        v = jnp.moveaxis(kv_pages[1][:, pages], 0, -4)
        lead = pages.shape[:-1]
        return (k.reshape(*lead, num_kv_heads, max_len, head_dim), v.reshape(*lead, num_kv_heads, max_len, head_dim))

    # ---- decode run: leading one-token requests --------------------------------------------
    slots = jnp.arange(num_slots)
    is_single = (q_lens == 1) & (slots < live)
    num_leading = jnp.argmin(jnp.append(is_single, False))  # first slot that is not a 1-token request
    decode_tokens = cu_q_lens[num_leading]
    block = min(_pow2_at_most(max(_GATHER_BUDGET // max_len, 1)), _pow2_at_most(num_tokens))
    slot_of, position, kv_len, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.zeros((num_tokens + _TILE_TOKENS, num_q_heads, head_dim), q.dtype)

    def decode_block(i, out):
        start = i * block
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block)  # noqa: E731
        k, v = gather(page_indices[sl(slot_of)])  # [Bd, Hkv, L, D]
        mask = attention_mask(sl(position), sl(kv_len), key_pos, params.sliding_window)
        mask &= (jnp.arange(block) + start < decode_tokens)[:, None]
        qb = sl(q).reshape(block, num_kv_heads, group, head_dim)
        o = _softmax_attend(qb, k, v, mask[:, None, None, :], params).reshape(block, num_q_heads, head_dim)
        return jax.lax.dynamic_update_slice_in_dim(out, o.astype(q.dtype), start, 0)

    out = jax.lax.fori_loop(0, (decode_tokens + block - 1) // block, decode_block, out)

    # ---- tiles: Bq query tokens of one request each --------------------------------------------
    tile = min(_TILE_TOKENS, _pow2_at_most(num_tokens))
    tiles_per_slot = jnp.where((slots >= num_leading) & (slots < live), (q_lens + tile - 1) // tile, 0)
    cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles_per_slot).astype(jnp.int32)])
    q_padded = jnp.concatenate([q, jnp.zeros((_TILE_TOKENS, num_q_heads, head_dim), q.dtype)])
    rows = jnp.arange(tile)

    def one_tile(j, out):
        s = jnp.searchsorted(cu_tiles[1:], j, side="right", method="compare_all")
        first = cu_q_lens[s] + (j - cu_tiles[s]) * tile  # first query token of the tile
        end = cu_q_lens[s + 1]
        k, v = gather(page_indices[s][None])  # [1, Hkv, L, D]
        tokens = first + rows
        mine = tokens < end
        pos = kv_lens[s] - (end - cu_q_lens[s]) + (tokens - cu_q_lens[s])
        mask = attention_mask(pos, jnp.broadcast_to(kv_lens[s], pos.shape), key_pos, params.sliding_window)
        mask &= mine[:, None]
        qt = jax.lax.dynamic_slice_in_dim(q_padded, first, tile).reshape(tile, num_kv_heads, group, head_dim)
        qt = jnp.moveaxis(qt, 0, 2).reshape(1, num_kv_heads, group * tile, head_dim)
        # Share K/V across the tile's tokens: fold the tokens into the query-group axis.
        full_mask = jnp.broadcast_to(mask[None], (group, tile, max_len)).reshape(1, 1, group * tile, max_len)
        o = _softmax_attend(qt, k, v, full_mask, params)  # [1, Hkv, G*Bq, D]
        o = jnp.moveaxis(o.reshape(num_kv_heads, group, tile, head_dim), 2, 0).reshape(tile, num_q_heads, head_dim)
        old = jax.lax.dynamic_slice_in_dim(out, first, tile)
        new = jnp.where(mine[:, None, None], o.astype(q.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, first, 0)

    out = jax.lax.fori_loop(0, cu_tiles[-1], one_tile, out)
    return jnp.where(valid[:, None, None], out[:num_tokens], 0)
