"""On-device sampling over a step's logits, one row per request slot.

The costly parts run only in the compiled variants that need them: `SamplerFlags` is static, so
a batch of greedy / temperature-only requests never pays for a vocabulary sort (top-k / top-p /
min-p), penalty histograms, sparse biases, bad words, grammar bitmasks or logprobs.

Randomness is per request and per position: row r samples with key fold_in(key(seed_r),
position_r), so a seeded request gives the same tokens alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

# OpenAI's cap on top_logprobs: the width of the top-logprobs table most requests fit.
OPENAI_MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplerFlags:
    """Which optional stages this compiled sampler has (static)."""

    all_greedy: bool = True  # argmax only: no randomness at all
    top_k_top_p: bool = False  # some row has top_k, top_p < 1 or min_p > 0
    penalties: bool = False  # some row has presence / frequency / repetition penalties
    sparse_bias: bool = False  # logit_bias, allowed_token_ids, min_tokens or bad stop suppression
    bad_words: bool = False  # some row has bad_words: tokens that would complete one are banned
    bitmask: bool = False  # structured outputs: packed allowed-token masks
    logprobs: bool = False  # some row asked for logprobs: the sampled token's logprob and rank
    top_logprobs: int = 0  # width of the top-logprobs table (a `LogprobWidths` width; 0 = none)
    logprob_token_ids: bool = False  # some row asked for the logprobs of given token ids


class LogprobWidths(NamedTuple):
    """The top-logprobs widths an engine compiles: `narrow` for the usual request, `wide` for those that ask
    for more, up to the engine's --max-logprobs (the whole vocabulary with -1).

    NOTE: two static widths, so a request within OpenAI's cap never pays for a wider table: the [S, W] ids
    and logprobs go to the host every step (a whole vocabulary of 128k ids is 1 MB a row), and on CPU a
    narrow top-k is also faster. With vLLM's default limit (20) they are one."""

    narrow: int
    wide: int

    @classmethod
    def of(cls, max_logprobs: int, vocab_size: int) -> LogprobWidths:
        wide = vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)
        return cls(min(OPENAI_MAX_TOP_LOGPROBS, wide), wide)

    def fitting(self, counts: list[int]) -> int:
        """The width that holds every one of these top-logprobs counts (-1: the whole vocabulary); 0 for none."""
        if not counts:
            return 0
        return self.narrow if all(0 <= k <= self.narrow for k in counts) else self.wide


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
    # Bad words (`_apply_bad_words`), L tokens at most: each row's words right-aligned, -1 before a word's first
    # token, a padded word all -1; the row's last L-1 output tokens, -1 before its first, the last one from the
    # previous step's tokens where it was still on the device (`pending_rows`).
    bad_word_ids: jax.Array | None = None  # [S, W, L] i32
    recent_outputs: jax.Array | None = None  # [S, L-1] i32
    pending_rows: jax.Array | None = None  # [S] i32 row of the last output in prev_tokens; -1 = in recent_outputs
    prev_tokens: jax.Array | None = None  # [R] i32 the previous step's sampled tokens, on device
    bitmask: jax.Array | None = None  # [S, ceil(V/32)] i32 packed allowed tokens; all ones = free
    logprob_token_ids: jax.Array | None = None  # [S, MAX_LOGPROB_TOKEN_IDS] i32 ids to give logprobs of; -1 = none


@jax.tree_util.register_dataclass
@dataclass
class LogprobOutputs:
    """Logprobs of the raw model distribution at each of N positions (sampled rows, or prompt tokens)."""

    chosen: jax.Array  # [N] f32 the chosen token's logprob (the sampled one, or the next prompt token)
    rank: jax.Array  # [N] i32 its rank; 1 = most likely
    top_ids: jax.Array  # [N, W] i32 the W most likely ids, most likely first
    top_values: jax.Array  # [N, W] f32 their logprobs
    token_id_values: jax.Array | None = None  # [N, MAX_LOGPROB_TOKEN_IDS] f32 logprobs of logprob_token_ids


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


def _apply_bad_words(logits: jax.Array, b: SamplingBatch) -> jax.Array:
    """Ban the last token of each bad word whose other tokens are the row's last outputs (a one-token word always)."""
    num_rows, vocab = logits.shape
    pending = b.prev_tokens[jnp.maximum(b.pending_rows, 0)]  # [S]
    last_output = jnp.where(b.pending_rows >= 0, pending, b.recent_outputs[:, -1])
    recent = jnp.concatenate([b.recent_outputs[:, :-1], last_output[:, None]], axis=1)  # [S, L-1]
    prefixes, last = b.bad_word_ids[:, :, :-1], b.bad_word_ids[:, :, -1]  # [S, W, L-1], [S, W]
    matched = jnp.all((prefixes < 0) | (prefixes == recent[:, None, :]), axis=-1) & (last >= 0)  # [S, W]
    banned = jnp.where(matched, last, vocab)  # out of range -> dropped
    return logits.at[jnp.arange(num_rows)[:, None], banned].set(-jnp.inf, mode="drop")


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
    # NOTE: top_p >= 1 keeps all: the float cumsum can reach 1 before the tail, which would drop tokens from
    # a row that asked for no top-p (and a row's tokens would depend on its batch's variant).
    keep = ((mass_before < b.top_p[:, None]) | (b.top_p[:, None] >= 1.0)) & (ranks < k[:, None])
    num_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(threshold, kth)
    # min-p: drop tokens whose probability is below min_p * the top probability.
    top_logit = sorted_desc[:, :1]
    min_p_floor = jnp.where(b.min_p[:, None] > 0, top_logit + jnp.log(jnp.maximum(b.min_p[:, None], 1e-30)), -jnp.inf)
    return jnp.where((logits >= threshold) & (logits >= min_p_floor), logits, -jnp.inf)


def logprob_outputs(raw_logits: jax.Array, chosen: jax.Array, width: int,
                    token_ids: jax.Array | None = None) -> LogprobOutputs:
    """raw_logits [N, V] f32, chosen [N] i32, token_ids [N, K] i32 or None (-1 = none) -> the chosen token's
    logprob and rank, the top `width` ids and logprobs (width: static), and the logprobs of token_ids."""
    logprobs = jax.nn.log_softmax(raw_logits, axis=-1)  # [N, V]
    chosen_logprob = jnp.take_along_axis(logprobs, chosen[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs > chosen_logprob[:, None], axis=-1) + 1
    num_rows = logprobs.shape[0]
    top_values, top_ids = jnp.zeros((num_rows, 0), jnp.float32), jnp.zeros((num_rows, 0), jnp.int32)
    if width:
        top_values, top_ids = jax.lax.top_k(logprobs, width)
    token_id_values = None
    if token_ids is not None:  # padding (-1) reads id 0, which the host never reads back
        token_id_values = jnp.take_along_axis(logprobs, jnp.maximum(token_ids, 0), axis=-1)
    return LogprobOutputs(chosen_logprob, rank.astype(jnp.int32), top_ids.astype(jnp.int32), top_values,
                          token_id_values)


def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags):
    """logits [S, V] f32 -> (tokens [S] i32, LogprobOutputs or None)."""
    raw = logits
    if flags.penalties:
        logits = _apply_penalties(logits, batch)
    if flags.sparse_bias:
        logits = _apply_sparse_bias(logits, batch)
    if flags.bad_words:
        logits = _apply_bad_words(logits, batch)
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
    if not flags.logprobs:
        return tokens, None
    return tokens, logprob_outputs(raw, tokens, flags.top_logprobs, batch.logprob_token_ids)
