"""The contract every ragged paged attention implementation shares.

KV page layout (one array per layer; the only place it is defined):

    kv_pages: [2, num_kv_heads, num_pages, page_size, head_dim]
              K is kv_pages[0], V is kv_pages[1].

Heads-major, so one (head, page) tile is one contiguous `page_size * head_dim` box: one TMA copy
per page in the Hopper kernel, and a plain gather in the XLA path. Tensor parallelism shards
axis 1 (KV heads).

A ragged batch of S request slots and T query tokens (both padded to buckets):

    q            [T, Hq, D]   query tokens of all requests, flat, request after request
    cu_q_lens    [S + 1] i32  request s owns tokens cu_q_lens[s] : cu_q_lens[s + 1]
    kv_lens      [S] i32      KV length of request s after this step (cached + new tokens)
    page_indices [S, P] i32   the pages of request s, in order; entries past its length unused
    num_seqs     [1] i32      live requests; slots s >= num_seqs are padding

The queries of request s sit at positions kv_lens[s] - q_len .. kv_lens[s] - 1 and attend
causally to keys 0 .. their own position (and, with a sliding window W, only to the last W
positions). Padded slots have q_len 0; padded tokens (past cu_q_lens[num_seqs]) give zeros.
Query head h reads KV head h // (Hq // Hkv), as HF's `repeat_kv`.

Optional attention sinks (gpt-oss), every implementation's keyword `sinks`:

    sinks        [Hq] f32     one learned logit per query head, in the softmax's denominator only

so out = sum_j exp(l_j - m) v_j / (sum_j exp(l_j - m) + exp(sinks[h] - m)), m the max of the
l_j and the sink, where l_j are the scaled (and soft-capped) logits: HF's gpt-oss
`eager_attention_forward` concatenates the sink after scaling. A token that sees no key still
gives zeros. sinks=None is plain softmax and traces today's program.

FP8 pages (`--kv-cache-dtype fp8`): kv_pages may be float8_e4m3fn whatever q's dtype; they hold
K / k_scale and V / v_scale (`AttentionParams.k_scale`, `v_scale`: one scale per tensor, as vLLM's
per-layer `_k_scale`), saturated to e4m3's +-448 by `write_kv_pages`. Readers dequantize: K = pages[0]
* k_scale. Per-tensor scales fold exactly into the logits' scale (sm_scale * k_scale) and the
output (v_scale * out), which is what the XLA path and the Mosaic kernel do; e4m3 values are exact
in bf16, so a tile upcast to bf16 loses nothing. Pages in q's dtype ignore the scales (1.0) and
trace the same program as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

FP8_KV_DTYPE = jnp.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3fn value


@dataclass(frozen=True)
class AttentionParams:
    """Static attention settings (hashable; part of the compiled step's identity)."""

    sm_scale: float
    sliding_window: int | None = None  # attend to at most this many most recent positions
    soft_cap: float | None = None  # logits -> soft_cap * tanh(logits / soft_cap)
    k_scale: float = 1.0  # FP8 pages: K = pages[0] * k_scale (vLLM's default without calibration: 1.0)
    v_scale: float = 1.0  # FP8 pages: V = pages[1] * v_scale


def is_fp8(kv_pages: jax.Array) -> bool:
    """Whether the pages hold scaled e4m3 values (common.py's FP8 pages)."""
    return jnp.dtype(kv_pages.dtype) == jnp.dtype(FP8_KV_DTYPE)


def quantize_fp8(x: jax.Array, scale: float) -> jax.Array:
    """x / scale, saturated to e4m3's finite range (a plain cast would give NaN past it), as e4m3."""
    scaled = x.astype(jnp.float32) / scale
    return jnp.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(FP8_KV_DTYPE)


def validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sinks=None) -> None:
    """Shape and dtype checks shared by every implementation (static, so free under jit)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if kv_pages.ndim != 5 or kv_pages.shape[0] != 2:
        raise ValueError(f"kv_pages must be [2, Hkv, num_pages, page_size, D], got {kv_pages.shape}")
    _, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, _, kv_head_dim = kv_pages.shape
    if kv_pages.dtype != q.dtype and not is_fp8(kv_pages):
        raise ValueError(f"kv_pages must be in q's dtype ({q.dtype}) or {jnp.dtype(FP8_KV_DTYPE).name}, "
                         f"got {kv_pages.dtype}")
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and kv_pages ({kv_head_dim}) differ")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    validate_metadata(kv_lens, page_indices, cu_q_lens, num_seqs)
    if sinks is not None and sinks.shape != (num_q_heads,):
        raise ValueError(f"sinks must be [Hq]={num_q_heads}, got {sinks.shape}")


def validate_metadata(kv_lens, page_indices, cu_q_lens, num_seqs) -> None:
    """The ragged batch's shapes and dtypes (static, so free under jit); MLA's batch is the same."""
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [S, pages_per_seq], got {page_indices.shape}")
    num_slots = page_indices.shape[0]
    if kv_lens.shape != (num_slots,):
        raise ValueError(f"kv_lens must be [S]={num_slots}, got {kv_lens.shape}")
    if cu_q_lens.shape != (num_slots + 1,):
        raise ValueError(f"cu_q_lens must be [S+1]={num_slots + 1}, got {cu_q_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be [1], got {num_seqs.shape}")
    for name, arr in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")


def write_kv_pages(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> jax.Array:
    """Write new tokens' K/V into their page slots; returns the updated pages.

    kv_pages [2, Hkv, P, page, D]; k, v [T, Hkv, D]; slot_mapping [T] i32 = page * page_size +
    offset. Padded tokens carry a slot >= P * page_size and are dropped. FP8 pages get K / k_scale
    and V / v_scale, saturated (`quantize_fp8`); other pages ignore the scales. Donate kv_pages at
    the jit boundary so this is an in-place scatter.
    """
    _, num_kv_heads, num_pages, page_size, head_dim = kv_pages.shape
    flat = jnp.asarray(kv_pages).reshape(2, num_kv_heads, num_pages * page_size, head_dim)
    if is_fp8(kv_pages):
        new = jnp.stack([quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)])  # [2, T, Hkv, D]
    else:
        new = jnp.stack([k, v]).astype(kv_pages.dtype)  # [2, T, Hkv, D]
    new = new.transpose(0, 2, 1, 3)  # [2, Hkv, T, D]
    flat = flat.at[:, :, slot_mapping].set(new, mode="drop")
    return flat.reshape(kv_pages.shape)


def token_metadata(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """Per query token: (request slot, absolute position, KV length, is a real token).

    All [T]. Used by the XLA path to vectorise over tokens.
    """
    num_slots = kv_lens.shape[0]
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    # The slot owning token t is the first s with cu_q_lens[s + 1] > t.
    slot = jnp.searchsorted(cu_q_lens[1:], tokens, side="right", method="compare_all").astype(jnp.int32)
    valid = tokens < cu_q_lens[num_seqs[0]]
    slot = jnp.minimum(slot, num_slots - 1)
    q_start = cu_q_lens[slot]
    q_len = cu_q_lens[slot + 1] - q_start
    kv_len = kv_lens[slot]
    position = kv_len - q_len + (tokens - q_start)
    return slot, position, kv_len, valid


def attention_mask(position, kv_len, key_pos, sliding_window: int | None):
    """[..., L] bool: which key positions a query at `position` may read."""
    mask = (key_pos <= position[..., None]) & (key_pos < kv_len[..., None])
    if sliding_window is not None:
        mask &= key_pos > position[..., None] - sliding_window
    return mask


def apply_soft_cap(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return logits
    return soft_cap * jnp.tanh(logits / soft_cap)
