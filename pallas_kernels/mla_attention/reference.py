"""Plain-jnp MLA attention: the test oracle of the absorbed and expanded forms (common.py).

Per request slot: build its dense latents (or K/V rows), score every query token against them,
keep only the tokens that belong to it and the keys each may see, softmax, weighted sum. Cost is
S x T x L, fine for tests and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mla_attention.common import validate_absorbed, validate_expanded
from pallas_kernels.ragged_paged_attention.common import attention_mask


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """logits, mask [T, H, L] -> weights; rows with no visible key give 0, not NaN."""
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.where(mask, weights, 0.0)


def mla_absorbed_reference(
    q_latent: jax.Array,  # [T, H, R]
    q_pe: jax.Array,  # [T, H, Dr]
    latent_pages: jax.Array,  # [num_pages, page_size, R + Dr]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, R]
    validate_absorbed(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, rank = q_latent.shape
    page_size = latent_pages.shape[1]
    num_slots, pages_per_seq = page_indices.shape
    max_len = pages_per_seq * page_size
    tokens = jnp.arange(num_tokens)
    key_pos = jnp.arange(max_len)
    q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(jnp.float32)  # [T, H, R + Dr]
    out = jnp.zeros((num_tokens, num_heads, rank), jnp.float32)
    for s in range(num_slots):
        start, end = cu_q_lens[s], cu_q_lens[s + 1]
        mine = (tokens >= start) & (tokens < end) & (s < num_seqs[0])  # [T]
        position = kv_lens[s] - (end - start) + (tokens - start)  # [T]
        latents = latent_pages[page_indices[s]].reshape(max_len, -1).astype(jnp.float32)  # [L, R + Dr]
        logits = jnp.einsum("thd,ld->thl", q, latents) * sm_scale
        mask = attention_mask(position, jnp.broadcast_to(kv_lens[s], position.shape), key_pos, None)
        weights = _masked_softmax(logits, jnp.broadcast_to(mask[:, None, :], logits.shape))
        o = jnp.einsum("thl,lr->thr", weights, latents[:, :rank])
        out = jnp.where(mine[:, None, None], o, out)
    return out.astype(q_latent.dtype)


def mla_expanded_reference(
    q: jax.Array,  # [T, H, Dqk]
    k: jax.Array,  # [Tk, H, Dqk]
    v: jax.Array,  # [Tk, H, Dv]
    cu_q_lens: jax.Array,  # [S + 1]
    cu_kv_lens: jax.Array,  # [S + 1]: request s's keys are rows cu_kv_lens[s] : cu_kv_lens[s + 1]
    num_seqs: jax.Array,  # [1]
    *,
    sm_scale: float,
) -> jax.Array:  # [T, H, Dv]
    validate_expanded(q, k, v, cu_q_lens, cu_kv_lens, num_seqs)
    num_tokens, num_heads, _ = q.shape
    num_keys = k.shape[0]
    tokens = jnp.arange(num_tokens)
    rows = jnp.arange(num_keys)
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("thd,lhd->thl", qf, kf) * sm_scale  # [T, H, Tk]
    out = jnp.zeros((num_tokens, num_heads, v.shape[2]), jnp.float32)
    for s in range(cu_q_lens.shape[0] - 1):
        start, end = cu_q_lens[s], cu_q_lens[s + 1]
        kv_start, kv_len = cu_kv_lens[s], cu_kv_lens[s + 1] - cu_kv_lens[s]
        mine = (tokens >= start) & (tokens < end) & (s < num_seqs[0])
        position = kv_len - (end - start) + (tokens - start)  # [T]
        mask = attention_mask(position, jnp.broadcast_to(kv_len, position.shape), rows - kv_start, None)
        mask &= (rows >= kv_start)[None, :]
        weights = _masked_softmax(logits, jnp.broadcast_to(mask[:, None, :], logits.shape))
        o = jnp.einsum("thl,lhd->thd", weights, vf)
        out = jnp.where(mine[:, None, None], o, out)
    return out.astype(q.dtype)
