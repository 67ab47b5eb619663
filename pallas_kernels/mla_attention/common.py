"""The contract every multi-head latent attention (MLA, DeepSeek-V2/V3) implementation shares.

Latent page layout (one array per layer; the only place it is defined):

    latent_pages: [num_pages, page_size, R + Dr]

R = kv_lora_rank (512 in DeepSeek-V2/V3), Dr = qk_rope_head_dim (64). Each token's slot holds its
compressed latent c_kv (after kv_a_layernorm) in [:R], then its rotary key k_pe (after RoPE) in
[R:]. All heads share it: one row per token, not per head. Tensor parallelism replicates it.

The ragged batch is ragged paged attention's (pallas_kernels/ragged_paged_attention/common.py):
cu_q_lens [S + 1], kv_lens [S], page_indices [S, P], num_seqs [1]; request s's queries sit at
positions kv_lens[s] - q_len .. kv_lens[s] - 1 and attend causally; padded tokens give zeros.

Two forms of the same attention (per head h, with W_UK[h] [R, Dn] and W_UV[h] [R, Dv] the
per-head slices of kv_b_proj):

- absorbed (decode, and any query as a fallback): the caller folds W_UK into the query,
      q_latent [T, H, R] = q_nope @ W_UK[h]^T,  q_pe [T, H, Dr],
      score = (q_latent . c_kv + q_pe . k_pe) * sm_scale,
      out_latent [T, H, R] = softmax(score) @ c_kv,
  and applies W_UV (and o_proj) to out_latent. Reads only the latents.
- expanded (prefill): the caller up-projects the request's latents to per-head K = [c_kv @ W_UK[h],
  k_pe] (Dn + Dr = 192) and V = c_kv @ W_UV[h] (Dv = 128), and attends over contiguous ragged K/V
  rows (`cu_kv_lens`), as vLLM's MLA prefill does with a varlen flash attention. `gather_latents`
  reads the request's cached latents from the pages for that.

q_latent . c_kv equals q_nope . (c_kv @ W_UK[h]), so both forms give the same output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import validate_metadata


def latent_width(latent_pages: jax.Array) -> int:
    """R + Dr: the width of one token's slot."""
    return latent_pages.shape[-1]


def write_latent_pages(latent_pages: jax.Array, latent: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Write new tokens' latents into their page slots; returns the updated pages.

    latent_pages [P, page, R + Dr]; latent [T, R + Dr] (c_kv then k_pe); slot_mapping [T] i32 =
    page * page_size + offset. Padded tokens carry a slot >= P * page_size and are dropped. Donate
    latent_pages at the jit boundary so this is an in-place scatter.
    """
    num_pages, page_size, width = latent_pages.shape
    if latent.shape[-1] != width:
        raise ValueError(f"latent rows are {latent.shape[-1]} wide, the pages' slots {width}")
    flat = latent_pages.reshape(num_pages * page_size, width)
    flat = flat.at[slot_mapping].set(latent.astype(latent_pages.dtype), mode="drop")
    return flat.reshape(latent_pages.shape)


def gather_latents(
    latent_pages: jax.Array,  # [P, page, R + Dr]
    page_indices: jax.Array,  # [S, pages_per_seq]
    cu_kv_lens: jax.Array,  # [S + 1]: request s's rows are cu_kv_lens[s] : cu_kv_lens[s + 1]
    num_rows: int,
) -> jax.Array:  # [num_rows, R + Dr]
    """Every request's cached latents, positions 0 .. kv_len - 1, as contiguous rows: the input of
    the expanded form's up-projection. Rows past cu_kv_lens[-1] are zeros."""
    page_size = latent_pages.shape[1]
    num_slots, pages_per_seq = page_indices.shape
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    slot = jnp.searchsorted(cu_kv_lens[1:], rows, side="right", method="compare_all")
    slot = jnp.minimum(slot, num_slots - 1).astype(jnp.int32)
    position = rows - cu_kv_lens[slot]
    entry = jnp.minimum(position // page_size, pages_per_seq - 1)
    page = page_indices[slot, entry]
    gathered = latent_pages[page, position % page_size]  # [num_rows, R + Dr]
    return jnp.where((rows < cu_kv_lens[-1])[:, None], gathered, 0)


def validate_absorbed(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> None:
    """Shape and dtype checks of the absorbed form (static)."""
    if q_latent.ndim != 3 or q_pe.ndim != 3 or q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_latent [T, H, R] and q_pe [T, H, Dr] disagree: {q_latent.shape}, {q_pe.shape}")
    if latent_pages.ndim != 3:
        raise ValueError(f"latent_pages must be [num_pages, page_size, R + Dr], got {latent_pages.shape}")
    width = q_latent.shape[2] + q_pe.shape[2]
    if latent_pages.shape[2] != width:
        raise ValueError(f"latent slots are {latent_pages.shape[2]} wide, q_latent + q_pe {width}")
    if q_latent.dtype != q_pe.dtype or latent_pages.dtype != q_latent.dtype:
        raise ValueError(f"q_latent, q_pe and latent_pages must share a dtype: "
                         f"{q_latent.dtype}, {q_pe.dtype}, {latent_pages.dtype}")
    validate_metadata(kv_lens, page_indices, cu_q_lens, num_seqs)


def validate_expanded(q, k, v, cu_q_lens, cu_kv_lens, num_seqs) -> None:
    """Shape and dtype checks of the expanded form (static)."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be [T, H, D]: {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != v.shape[:2] or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q [T, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] disagree: {q.shape}, {k.shape}, {v.shape}")
    if cu_q_lens.shape != cu_kv_lens.shape or cu_q_lens.ndim != 1:
        raise ValueError(f"cu_q_lens and cu_kv_lens must both be [S+1]: {cu_q_lens.shape}, {cu_kv_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be [1], got {num_seqs.shape}")
    for name, arr in (("cu_q_lens", cu_q_lens), ("cu_kv_lens", cu_kv_lens)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
