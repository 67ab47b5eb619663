"""On-device sampling over a step's logits, one row per request slot.

The costly parts run only in the compiled variants that need them: `SamplerFlags` is static, so
a batch of greedy / temperature-only requests never pays for a vocabulary sort (top-k / top-p /
min-p), penalty histograms, sparse biases, grammar bitmasks or logprobs.

Randomness is per request and per position: row r samples with key fold_in(key(seed_r),
position_r), so a seeded request gives the same tokens alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.sampling_params import MAX_LOGPROBS


@dataclass(frozen=True)
class SamplerFlags:
    """Which optional stages this compiled sampler has (static)."""

    all_greedy: bool = True  # argmax only: no randomness at all
    top_k_top_p: bool = False  # some row has top_k, top_p < 1 or min_p > 0
    penalties: bool = False  # some row has presence / frequency / repetition penalties
    sparse_bias: bool = False  # logit_bias, allowed_token_ids, min_tokens or bad stop suppression
    bitmask: bool = False  # structured outputs: packed allowed-token masks
    logprobs: bool = False  # some row asked for logprobs


@jax.tree_util.register_dataclass
@dataclass
class SamplingBatch:
    """Per-row sampling tensors, padded to the step's S rows. Optional fields are None unless
    their flag is on (so the pytree, and the compiled variant, follows the flags)."""

    temperature: jax.Array  # [S] f32; 0 = greedy
    seeds: jax.Array  # [S] u32
    positions: jax.Array  # [S] i32 position of the token being sampled (key fold-in)
    top_k: jax.Array | None = None  # [S] i32; 0 = off
    top_p: jax.Array | None = None  # [S] f32; 1 = off
    min_p: jax.Array | None = None  # [S] f32; 0 = off
    presence_penalty: jax.Array | None = None  # [S] f32
    frequency_penalty: jax.Array | None = None  # [S] f32
    repetition_penalty: jax.Array | None = None  # [S] f32; 1 = off
    output_tokens: jax.Array | None = None  # [S, H] i32 generated tokens so far; -1 = none
    prompt_tokens: jax.Array | None = None  # [S, H] i32 prompt tokens; -1 = none (repetition penalty)
    bias_ids: jax.Array | None = None  # [S, K] i32 token ids; -1 = none
    bias_values: jax.Array | None = None  # [S, K] f32 added to those logits (-inf bans)
    allowed_only: jax.Array | None = None  # [S] bool: only tokens in bias_ids are allowed
    bitmask: jax.Array | None = None  # [S, ceil(V/32)] i32 packed allowed tokens; all ones = free


def _apply_penalties(logits: jax.Array, b: SamplingBatch) -> jax.Array:
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]

    def counts(tokens):  # [S, H] -> [S, V] occurrences
        valid = tokens >= 0
        return jnp.zeros((num_rows, vocab), jnp.float32).at[rows, jnp.where(valid, tokens, 0)].add(
            valid.astype(jnp.float32)
        )

    out_counts = counts(b.output_tokens)
    seen = (out_counts + counts(b.prompt_tokens)) > 0
    rep = b.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency_penalty[:, None] * out_counts
    return logits - b.presence_penalty[:, None] * (out_counts > 0)


def _apply_sparse_bias(logits: jax.Array, b: SamplingBatch) -> jax.Array:
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    valid = b.bias_ids >= 0
    ids = jnp.where(valid, b.bias_ids, vocab)  # out of range -> dropped
    listed = jnp.zeros((num_rows, vocab), bool).at[rows, ids].set(True, mode="drop")
    logits = jnp.where(b.allowed_only[:, None] & ~listed, -jnp.inf, logits)
    return logits.at[rows, ids].add(jnp.where(valid, b.bias_values, 0.0), mode="drop")


def _apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    num_rows, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


def _apply_top_k_top_p_min_p(logits: jax.Array, b: SamplingBatch) -> jax.Array:
    """Mask tokens outside each row's top-k, top-p nucleus and min-p floor (one sort)."""
    vocab = logits.shape[1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(b.top_k > 0, jnp.minimum(b.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches top_p.
    ranks = jnp.arange(vocab)[None, :]
    sorted_masked = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_masked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < b.top_p[:, None]) & (ranks < k[:, None])
    num_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(threshold, kth)
    # min-p: drop tokens whose probability is below min_p * the top probability.
    top_logit = sorted_desc[:, :1]
    min_p_floor = jnp.where(b.min_p[:, None] > 0, top_logit + jnp.log(jnp.maximum(b.min_p[:, None], 1e-30)), -jnp.inf)
    return jnp.where((logits >= threshold) & (logits >= min_p_floor), logits, -jnp.inf)


def _logprob_outputs(raw_logits: jax.Array, tokens: jax.Array):
    """Top-MAX_LOGPROBS ids/logprobs of the raw model distribution, plus the sampled token's."""
    logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    top_values, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs > sampled[:, None], axis=-1) + 1
    return top_ids.astype(jnp.int32), top_values, sampled, rank.astype(jnp.int32)


def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags):
    """logits [S, V] f32 -> (tokens [S] i32, logprob outputs or None)."""
    raw = logits
    if flags.penalties:
        logits = _apply_penalties(logits, batch)
    if flags.sparse_bias:
        logits = _apply_sparse_bias(logits, batch)
    if flags.bitmask:
        logits = _apply_bitmask(logits, batch.bitmask)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if flags.all_greedy:
        tokens = greedy_tokens
    else:
        temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        scaled = logits / temperature
        if flags.top_k_top_p:
            scaled = _apply_top_k_top_p_min_p(scaled, batch)

        def gumbel(seed, position):
            key = jax.random.fold_in(jax.random.key(seed), position)
            return jax.random.gumbel(key, (logits.shape[1],), jnp.float32)

        noise = jax.vmap(gumbel)(batch.seeds, batch.positions)  # [S, V]
        sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
        tokens = jnp.where(batch.temperature > 0, sampled, greedy_tokens)
    logprob_out = _logprob_outputs(raw, tokens) if flags.logprobs else None
    return tokens, logprob_out
