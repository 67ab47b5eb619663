"""MLA attention in plain XLA, both forms (common.py): serves on CPU and is the GPU fallback.

Both walk query tiles over key chunks with an online softmax (tiles.py). The absorbed form
gathers each chunk's latent pages once per tile, for all heads; the expanded form slices each
request's contiguous K/V rows. Any mix of decodes and prefill chunks, in any order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mla_attention.common import validate_absorbed, validate_expanded
from pallas_kernels.mla_attention.tiles import (
    KeyChunk,
    MlaXlaBlocks,
    TokenInfo,
    attend_tiles,
    decode_tiles,
    prefill_tiles,
    token_info,
)

DEFAULT_BLOCKS = MlaXlaBlocks()


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _both_tilings(out, q, info: TokenInfo, cu_q_lens, num_seqs, blocks: MlaXlaBlocks, chunk: int, **attend):
    """Decode tiles, then prefill tiles, each block size cut to the batch."""
    num_tokens = q.shape[0]
    decode_block = min(blocks.decode_block, _pow2_at_most(num_tokens))
    out = attend_tiles(out, q, info, decode_tiles(info, decode_block), decode_block, chunk, **attend)
    tile = min(blocks.tile_tokens, _pow2_at_most(num_tokens))
    tiles = prefill_tiles(cu_q_lens, num_seqs, num_tokens, tile, blocks.prefill_block)
    return attend_tiles(out, q, info, tiles, blocks.prefill_block, chunk, **attend)


def mla_absorbed_xla(
    q_latent: jax.Array,  # [T, H, R]
    q_pe: jax.Array,  # [T, H, Dr]
    latent_pages: jax.Array,  # [num_pages, page_size, R + Dr]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    *,
    sm_scale: float,
    blocks: MlaXlaBlocks = DEFAULT_BLOCKS,
) -> jax.Array:  # [T, H, R]
    validate_absorbed(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, rank = q_latent.shape
    page_size = latent_pages.shape[1]
    num_slots, pages_per_seq = page_indices.shape
    chunk_pages = min(_pow2_at_most(max(blocks.chunk_tokens // page_size, 1)), _pow2_at_most(pages_per_seq))
    pad = -pages_per_seq % chunk_pages
    if pad:  # whole chunks; padded pages lie past every kv_len
        page_indices = jnp.pad(page_indices, ((0, 0), (0, pad)))
    chunk = chunk_pages * page_size
    q = jnp.concatenate([q_latent, q_pe], axis=-1)  # [T, H, R + Dr]

    def key_chunk(slot, j):
        ids = jax.lax.dynamic_slice_in_dim(page_indices[slot], j * chunk_pages, chunk_pages, axis=1)  # [B, Cp]
        latents = latent_pages[ids].reshape(slot.shape[0], chunk, -1)  # [B, C, R + Dr]
        return KeyChunk(latents, latents[..., :rank])

    def score(qb, latents):
        return jnp.einsum("bnhd,bcd->bnhc", qb, latents, preferred_element_type=jnp.float32)

    def weigh(p, c_kv):
        return jnp.einsum("bnhc,bcr->bnhr", p.astype(c_kv.dtype), c_kv, preferred_element_type=jnp.float32)

    info = token_info(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.zeros((num_tokens, num_heads, rank), q_latent.dtype)
    out = _both_tilings(out, q, info, cu_q_lens, num_seqs, blocks, chunk, key_chunk=key_chunk, score=score,
                        weigh=weigh, sm_scale=sm_scale)
    return jnp.where(info.valid[:, None, None], out, 0)


def mla_expanded_xla(
    q: jax.Array,  # [T, H, Dqk]
    k: jax.Array,  # [Tk, H, Dqk]
    v: jax.Array,  # [Tk, H, Dv]
    cu_q_lens: jax.Array,  # [S + 1]
    cu_kv_lens: jax.Array,  # [S + 1]: request s's keys are rows cu_kv_lens[s] : cu_kv_lens[s + 1]
    num_seqs: jax.Array,  # [1]
    *,
    sm_scale: float,
    blocks: MlaXlaBlocks = DEFAULT_BLOCKS,
) -> jax.Array:  # [T, H, Dv]
    validate_expanded(q, k, v, cu_q_lens, cu_kv_lens, num_seqs)
    num_tokens, num_heads, _ = q.shape
    chunk = blocks.chunk_tokens
    # Rows past the end of k/v: a chunk may run past the last request's keys (masked there).
    k_pad = jnp.concatenate([k, jnp.zeros((chunk, *k.shape[1:]), k.dtype)])
    v_pad = jnp.concatenate([v, jnp.zeros((chunk, *v.shape[1:]), v.dtype)])
    kv_starts = cu_kv_lens[:-1]
    offsets = jnp.arange(chunk, dtype=jnp.int32)

    def key_chunk(slot, j):
        rows = jnp.minimum(kv_starts[slot][:, None] + j * chunk + offsets[None], k_pad.shape[0] - 1)  # [B, C]
        return KeyChunk(k_pad[rows], v_pad[rows])  # [B, C, H, Dqk], [B, C, H, Dv]

    def score(qb, keys):
        return jnp.einsum("bnhd,bchd->bnhc", qb, keys, preferred_element_type=jnp.float32)

    def weigh(p, values):
        return jnp.einsum("bnhc,bchd->bnhd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)

    kv_lens = cu_kv_lens[1:] - cu_kv_lens[:-1]
    info = token_info(cu_q_lens, kv_lens, num_seqs, num_tokens)
    out = jnp.zeros((num_tokens, num_heads, v.shape[2]), q.dtype)
    out = _both_tilings(out, q, info, cu_q_lens, num_seqs, blocks, chunk, key_chunk=key_chunk, score=score,
                        weigh=weigh, sm_scale=sm_scale)
    return jnp.where(info.valid[:, None, None], out, 0)
