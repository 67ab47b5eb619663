"""The test oracle: a plain loop over request slots, obviously correct, in float32.

For each slot s: rebuild its dense K/V from its pages, score every query token against it, keep
only the tokens that belong to s and the keys each may see, softmax (with the sink as one more
logit, as HF's gpt-oss computes it), weighted sum. Cost is S x T x L, fine for tests and nothing
else. FP8 pages are dequantized as they are read (x * scale, common.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import (
    AttentionParams,
    apply_soft_cap,
    attention_mask,
    is_fp8,
    validate_inputs,
)


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    params: AttentionParams,
    *,
    sinks: jax.Array | None = None,  # [Hq]
) -> jax.Array:  # [T, Hq, D]
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sinks)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pages.shape[1], kv_pages.shape[3]
    group = num_q_heads // num_kv_heads
    num_slots, pages_per_seq = page_indices.shape
    max_len = pages_per_seq * page_size
    tokens = jnp.arange(num_tokens)
    key_pos = jnp.arange(max_len)
    qf = q.astype(jnp.float32)
    fp8 = is_fp8(kv_pages)
    out = jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32)
    for s in range(num_slots):
        live = s < num_seqs[0]
        start, end = cu_q_lens[s], cu_q_lens[s + 1]
        mine = (tokens >= start) & (tokens < end) & live  # [T]
        kv_len = kv_lens[s]
        position = kv_len - (end - start) + (tokens - start)  # [T]
        k = kv_pages[0][:, page_indices[s]].reshape(num_kv_heads, max_len, head_dim).astype(jnp.float32)
        v = kv_pages[1][:, page_indices[s]].reshape(num_kv_heads, max_len, head_dim).astype(jnp.float32)
        if fp8:
            k, v = k * params.k_scale, v * params.v_scale
        k = jnp.repeat(k, group, axis=0)  # [Hq, L, D]
        v = jnp.repeat(v, group, axis=0)
        logits = jnp.einsum("thd,hld->thl", qf, k) * params.sm_scale
        logits = apply_soft_cap(logits, params.soft_cap)
        mask = attention_mask(position, jnp.broadcast_to(kv_len, position.shape), key_pos, params.sliding_window)
        logits = jnp.where(mask[:, None, :], logits, -jnp.inf)  # [T, Hq, L]
        if sinks is None:
            weights = jax.nn.softmax(logits, axis=-1)
        else:  # the sink: one more logit per head, dropped after the softmax
            sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], (num_tokens, num_q_heads, 1))
            weights = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
        weights = jnp.where(mask[:, None, :], weights, 0.0)  # rows with no key give 0, not NaN
        o = jnp.einsum("thl,hld->thd", weights, v)
        out = jnp.where(mine[:, None, None], o, out)
    return out.astype(q.dtype)
