"""Vectorised paged attention in plain XLA: gather pages chunk by chunk, online softmax.

Serves on CPU and is the GPU fallback when the Pallas kernel does not fit the model.

Work is shaped by the batch's data, not by the padded bucket, through loops with data-dependent
trip counts:

- decode run: the leading requests with one query token each (the runner orders decodes
  first), taken shortest-context first in blocks of `Bd` tokens; each block walks its tokens'
  pages in chunks of `C` positions only as far as its longest context.
- tiles: every other request, cut into tiles of up to `Bq` query tokens of one request; a tile
  walks that request's pages once for all its tokens, only as far as its last query position.

So the K/V gathered per step is about the sum of the contexts, not tokens x the bucket width.
With a sliding window W each row starts at its window's first page instead, and a chunk holds
at most one decode's window (C cut to the pages W keys can span), so a decode gathers about W
keys, whatever its context. `XlaBlockSizes` holds C, Bd and Bq.

FP8 pages: each chunk's K/V is upcast to q's dtype as it is gathered (exact), k_scale joins the
logits' scale and v_scale the output (common.py).

NOTE: requests are correct in any order; decodes placed after a prefill are merely handled as
one-token tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import (
    AttentionParams,
    apply_soft_cap,
    is_fp8,
    token_metadata,
    validate_inputs,
)


@dataclass(frozen=True)
class XlaBlockSizes:
    """The loops' block sizes (static; upper bounds, cut to powers of two that fit the batch).

    The defaults are what the engine runs; tests pass small ones so that every loop runs many
    iterations on a small batch. Any sizes give the same result."""

    chunk_tokens: int = 256  # context positions per chunk (C)
    decode_block: int = 128  # decode tokens per block (Bd)
    tile_tokens: int = 256  # query tokens per prefill tile (Bq)


DEFAULT_BLOCKS = XlaBlockSizes()


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _attend_chunked(q, pages, pos, valid, kv_len, kv_pages, params: AttentionParams, chunk_pages: int, sink=None):
    """Online-softmax attention over page chunks, up to the furthest query position.

    q [B, Hkv, M, D]; pages [B, P] (P a multiple of chunk_pages); pos, valid [B, M] (query
    positions, real rows); kv_len [B]; sink: None or [Hkv, M] f32, each row's sink logit.
    Returns [B, Hkv, M, D] f32.

    With a sliding window each row b starts at the page holding its earliest real query's first
    visible key, so the chunks walked (and the K/V gathered) scale with the window plus the
    rows' query span, not with the context.
    """
    num_rows, num_kv_heads, num_q, head_dim = q.shape
    page_size = kv_pages.shape[3]
    chunk = chunk_pages * page_size
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    window = params.sliding_window
    fp8 = is_fp8(kv_pages)
    logit_scale = params.sm_scale * params.k_scale if fp8 else params.sm_scale
    out_scale = params.v_scale if fp8 else 1.0
    if window is None:
        reach = jnp.max(jnp.where(valid, jnp.minimum(pos, kv_len[:, None] - 1), -1)) + 1  # positions needed
        num_chunks = (reach + chunk - 1) // chunk
    else:
        row_reach = jnp.max(jnp.where(valid, jnp.minimum(pos, kv_len[:, None] - 1), -1), axis=1) + 1  # [B]
        earliest = jnp.min(jnp.where(valid, jnp.maximum(pos - window + 1, 0), jnp.iinfo(jnp.int32).max), axis=1)
        first_page = jnp.minimum(earliest, row_reach) // page_size  # [B]; 0 for rows with no real query
        span = jnp.max(row_reach - first_page * page_size)
        num_chunks = (span + chunk - 1) // chunk
        page_offsets = jnp.arange(chunk_pages, dtype=jnp.int32)

    def chunk_pages_and_positions(j):
        """The chunk's page ids [B, Cp] and key positions [B or 1, C]."""
        if window is None:
            ids = jax.lax.dynamic_slice_in_dim(pages, j * chunk_pages, chunk_pages, axis=1)
            return ids, (j * chunk + offsets)[None]
        entries = first_page[:, None] + j * chunk_pages + page_offsets  # [B, Cp]
        # Entries past the table repeat its last page; their positions lie past every kv_len.
        ids = jnp.take_along_axis(pages, jnp.minimum(entries, pages.shape[1] - 1), axis=1)
        return ids, first_page[:, None] * page_size + j * chunk + offsets

    def body(j, carry):
        m, denom, acc = carry
        ids, key_pos = chunk_pages_and_positions(j)
        k = jnp.moveaxis(kv_pages[0][:, ids], 0, 1).reshape(num_rows, num_kv_heads, chunk, head_dim)
        v = jnp.moveaxis(kv_pages[1][:, ids], 0, 1).reshape(num_rows, num_kv_heads, chunk, head_dim)
        if fp8:  # e4m3 -> q's dtype is exact; the scales are folded into logit_scale and the output
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        key_pos = key_pos[:, None, :]  # [B or 1, 1, C]
        mask = (key_pos <= pos[:, :, None]) & (key_pos < kv_len[:, None, None])
        if window is not None:
            mask &= key_pos > pos[:, :, None] - window
        mask &= valid[:, :, None]
        mask = mask[:, None]  # [B, 1, M, C]
        logits = jnp.einsum("bkmd,bkcd->bkmc", q, k, preferred_element_type=jnp.float32)
        logits = apply_soft_cap(logits * logit_scale, params.soft_cap)
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(logits - safe[..., None]), 0.0)
        scale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
        denom_new = denom * scale + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkmc,bkcd->bkmd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, denom_new, acc * scale[..., None] + pv

    init = (
        jnp.full((num_rows, num_kv_heads, num_q), -jnp.inf, jnp.float32),
        jnp.zeros((num_rows, num_kv_heads, num_q), jnp.float32),
        jnp.zeros((num_rows, num_kv_heads, num_q, head_dim), jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    if out_scale != 1.0:
        acc = acc * out_scale
    if sink is None:
        return acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    # The sink joins the denominator: rescale to the max over the keys and the sink.
    top = jnp.maximum(m, sink)  # [B, Hkv, M], finite
    keep = jnp.exp(m - top)  # 0 for rows that saw no key (m = -inf)
    return acc * (keep / (denom * keep + jnp.exp(sink - top)))[..., None]


def ragged_paged_attention_xla(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    params: AttentionParams,
    *,
    sinks: jax.Array | None = None,  # [Hq]
    blocks: XlaBlockSizes = DEFAULT_BLOCKS,
) -> jax.Array:  # [T, Hq, D]
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sinks)
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    )
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pages.shape[1], kv_pages.shape[3]
    group = num_q_heads // num_kv_heads
    num_slots, pages_per_seq = page_indices.shape
    chunk_pages = min(_pow2_at_most(max(blocks.chunk_tokens // page_size, 1)), _pow2_at_most(pages_per_seq))
    if params.sliding_window is not None:
        # One chunk holds a decode's whole window: its keys span at most this many pages.
        chunk_pages = min(chunk_pages, -(-(params.sliding_window - 1) // page_size) + 1)
    pad = -pages_per_seq % chunk_pages
    if pad:  # whole chunks; padded pages lie past every kv_len
        page_indices = jnp.pad(page_indices, ((0, 0), (0, pad)))
    live = num_seqs[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    slot_of, position, kv_len, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.zeros((num_tokens + blocks.tile_tokens, num_q_heads, head_dim), q.dtype)

    # ---- decode run: leading one-token requests, shortest context first ----------------------
    slots = jnp.arange(num_slots)
    is_single = (q_lens == 1) & (slots < live)
    num_leading = jnp.argmin(jnp.append(is_single, False))  # first slot that is not a 1-token request
    decode_tokens = cu_q_lens[num_leading]
    tokens = jnp.arange(num_tokens)
    in_run = tokens < decode_tokens
    order = jnp.argsort(jnp.where(in_run, kv_len, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)  # [T]
    block = min(blocks.decode_block, _pow2_at_most(num_tokens))
    order = jnp.pad(order, (0, block), constant_values=num_tokens)  # a whole last block; index T = padding
    q_pad = jnp.concatenate([q, jnp.zeros((blocks.tile_tokens, num_q_heads, head_dim), q.dtype)])
    slot_pad = jnp.pad(slot_of, (0, blocks.tile_tokens))
    head_sinks = None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group)  # [Hkv, G]

    def decode_block(i, out):
        idx = jax.lax.dynamic_slice_in_dim(order, i * block, block)  # [Bd] token ids
        real = (idx < decode_tokens) & (jnp.arange(block) + i * block < decode_tokens)
        tok = jnp.where(real, idx, num_tokens)
        qb = q_pad[tok].reshape(block, num_kv_heads, group, head_dim)
        lens = jnp.where(real, kv_len[jnp.minimum(tok, num_tokens - 1)], 0)
        pos = jnp.broadcast_to((lens - 1)[:, None], (block, group))
        o = _attend_chunked(qb, page_indices[slot_pad[tok]], pos, jnp.broadcast_to(real[:, None], (block, group)),
                            lens, kv_pages, params, chunk_pages, head_sinks)
        return out.at[tok].set(o.reshape(block, num_q_heads, head_dim).astype(q.dtype), mode="drop")

    out = jax.lax.fori_loop(0, (decode_tokens + block - 1) // block, decode_block, out)

    # ---- tiles: up to Bq query tokens of one request each ------------------------------------
    tile = min(blocks.tile_tokens, _pow2_at_most(num_tokens))
    tiles_per_slot = jnp.where((slots >= num_leading) & (slots < live), (q_lens + tile - 1) // tile, 0)
    cu_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles_per_slot).astype(jnp.int32)])
    rows = jnp.arange(tile)

    def one_tile(j, out):
        s = jnp.searchsorted(cu_tiles[1:], j, side="right", method="compare_all")
        first = cu_q_lens[s] + (j - cu_tiles[s]) * tile  # first query token of the tile
        end = cu_q_lens[s + 1]
        mine = first + rows < end
        pos = kv_lens[s] - (end - cu_q_lens[s]) + (first + rows - cu_q_lens[s])  # [Bq]
        qt = jax.lax.dynamic_slice_in_dim(q_pad, first, tile).reshape(tile, num_kv_heads, group, head_dim)
        # One row of K/V for the whole tile: fold the tokens into the query axis.
        qt = jnp.moveaxis(qt, 0, 2).reshape(1, num_kv_heads, group * tile, head_dim)
        rep = lambda x: jnp.broadcast_to(x[None], (group, tile)).reshape(1, group * tile)  # noqa: E731
        tile_sinks = None if sinks is None else jnp.repeat(head_sinks, tile, axis=1)  # [Hkv, G * Bq]
        o = _attend_chunked(qt, page_indices[s][None], rep(pos), rep(mine), kv_lens[s][None], kv_pages, params,
                            chunk_pages, tile_sinks)
        o = jnp.moveaxis(o.reshape(num_kv_heads, group, tile, head_dim), 2, 0).reshape(tile, num_q_heads, head_dim)
        old = jax.lax.dynamic_slice_in_dim(out, first, tile)
        new = jnp.where(mine[:, None, None], o.astype(q.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, first, 0)

    out = jax.lax.fori_loop(0, cu_tiles[-1], one_tile, out)
    return jnp.where(valid[:, None, None], out[:num_tokens], 0)
