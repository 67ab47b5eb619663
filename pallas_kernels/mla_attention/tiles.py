"""The XLA paths' work decomposition: query tiles of one request each, walked over key chunks with
an online softmax, for both MLA forms (xla.py supplies where the keys come from and how a chunk
is scored).

- decode tiles: one token of a one-token request (anywhere in the batch), taken shortest context
  first in blocks of `decode_block` tiles;
- prefill tiles: up to `tile_tokens` consecutive tokens of a longer request, `prefill_block`
  tiles per block.

Each block walks its keys in chunks of `chunk_tokens` positions, only as far as its furthest
query position (data-dependent trip counts), so the keys read per step are about the sum of the
contexts, not tokens x the bucket width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import token_metadata


@dataclass(frozen=True)
class MlaXlaBlocks:
    """Block sizes of the XLA paths (static). Tests pass small ones so every loop runs many
    iterations on a small batch; any sizes give the same result."""

    chunk_tokens: int = 256  # key positions per chunk
    decode_block: int = 64  # decode tiles per block
    tile_tokens: int = 64  # query tokens per prefill tile
    prefill_block: int = 1  # prefill tiles per block


class Tiles(NamedTuple):
    """Tiles as rows of token ids; empty rows and past-the-end entries hold T (dropped on write)."""

    tokens: jax.Array  # [N, n] i32, N a multiple of the block size
    count: jax.Array  # [] i32: real tiles (the first `count` rows)


class KeyChunk(NamedTuple):
    keys: jax.Array  # [B, C, ...]: what `score` reads
    values: jax.Array  # [B, C, ...]: what `weigh` reads


class TokenInfo(NamedTuple):
    """Per query token, all [T]."""

    slot: jax.Array
    position: jax.Array
    kv_len: jax.Array
    valid: jax.Array
    is_decode: jax.Array  # a real token of a one-token request


def token_info(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> TokenInfo:
    slot, position, kv_len, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    q_len = cu_q_lens[slot + 1] - cu_q_lens[slot]
    return TokenInfo(slot, position, kv_len, valid, valid & (q_len == 1))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def decode_tiles(info: TokenInfo, block: int) -> Tiles:
    """One tile per decode token, shortest context first (a block's chunks stop at its longest)."""
    num_tokens = info.slot.shape[0]
    order = jnp.argsort(jnp.where(info.is_decode, info.kv_len, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)
    count = jnp.sum(info.is_decode, dtype=jnp.int32)
    order = jnp.where(jnp.arange(num_tokens) < count, order, num_tokens)
    order = jnp.pad(order, (0, _round_up(num_tokens, block) - num_tokens), constant_values=num_tokens)
    return Tiles(order[:, None], count)


def prefill_tiles(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int, tile: int, block: int) -> Tiles:
    """Every request of more than one token cut into tiles of up to `tile` tokens."""
    num_slots = cu_q_lens.shape[0] - 1
    q_lens = jnp.where(jnp.arange(num_slots) < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)
    per_slot = jnp.where(q_lens > 1, (q_lens + tile - 1) // tile, 0)
    tile_end = jnp.cumsum(per_slot).astype(jnp.int32)  # [S]
    bound = _round_up(num_tokens // 2 + num_slots, block)  # tiles of >= 2 tokens: at most T/2 + S
    j = jnp.arange(bound, dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(tile_end, j, side="right", method="compare_all"), num_slots - 1)
    first = cu_q_lens[slot] + (j - (tile_end[slot] - per_slot[slot])) * tile
    tokens = first[:, None] + jnp.arange(tile, dtype=jnp.int32)[None]  # [N, n]
    real = (j < tile_end[-1])[:, None] & (tokens < cu_q_lens[slot + 1][:, None])
    return Tiles(jnp.where(real, tokens, num_tokens), tile_end[-1])


def attend_tiles(
    out: jax.Array,  # [T, H, Dout]
    q: jax.Array,  # [T, H, Dq]
    info: TokenInfo,
    tiles: Tiles,
    block: int,
    chunk: int,
    key_chunk: Callable[[jax.Array, jax.Array], KeyChunk],
    score: Callable[[jax.Array, jax.Array], jax.Array],
    weigh: Callable[[jax.Array, jax.Array], jax.Array],
    sm_scale: float,
) -> jax.Array:  # [T, H, Dout]
    """Attention of every tile's tokens to their request's keys, written into `out`.

    key_chunk(slot [B], j) -> the keys and values at positions j * chunk + [0, chunk) of each
    row's request (anything past its kv_len is masked); score(q [B, n, H, Dq], keys) -> [B, n, H,
    C] f32 logits before scaling; weigh(p [B, n, H, C], values) -> [B, n, H, Dout] f32.
    """
    num_heads = q.shape[1]
    q_pad = jnp.concatenate([q, jnp.zeros((1, *q.shape[1:]), q.dtype)])
    last = lambda x, fill: jnp.concatenate([x, jnp.full((1,), fill, x.dtype)])  # noqa: E731 - index T = padding
    slot_pad, pos_pad, valid_pad = last(info.slot, 0), last(info.position, -1), last(info.valid, False)
    offsets = jnp.arange(chunk, dtype=jnp.int32)

    def one_block(i, out):
        tok = jax.lax.dynamic_slice_in_dim(tiles.tokens, i * block, block)  # [B, n]
        slot = slot_pad[tok[:, 0]]  # [B]: every token of a tile is its request's
        pos, valid = pos_pad[tok], valid_pad[tok]  # [B, n]
        qb = q_pad[tok]  # [B, n, H, Dq]
        num_chunks = (jnp.max(jnp.where(valid, pos, -1)) + chunk) // chunk

        def step(j, carry):
            m, denom, acc = carry
            keys, values = key_chunk(slot, j)
            key_pos = j * chunk + offsets  # [C]
            mask = (key_pos[None, None, :] <= pos[:, :, None]) & valid[:, :, None]  # [B, n, C]
            mask = mask[:, :, None, :]  # [B, n, 1, C]
            logits = jnp.where(mask, score(qb, keys) * sm_scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(mask, jnp.exp(logits - safe[..., None]), 0.0)
            rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
            denom = denom * rescale + jnp.sum(p, axis=-1)
            return m_new, denom, acc * rescale[..., None] + weigh(p, values)

        rows = tok.shape + (num_heads,)
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, out.shape[2]), jnp.float32))
        _, denom, acc = jax.lax.fori_loop(0, num_chunks, step, init)
        o = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
        return out.at[tok].set(o.astype(out.dtype), mode="drop")

    num_blocks = (tiles.count + block - 1) // block
    return jax.lax.fori_loop(0, num_blocks, one_block, out)
