"""On-device sampling against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.runner.sampler import LogprobWidths, SamplerFlags, SamplingBatch, sample

V = 50
S = 4


def _batch(**kw):
    base = dict(
        temperature=np.full(S, 1.0, np.float32),
        seeds=np.arange(S, dtype=np.uint32) + 11,
        positions=np.full(S, 7, np.int32),
    )
    base.update(kw)
    return SamplingBatch(**base)


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal((S, V)).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    tokens, _ = sample(logits, _batch(temperature=np.zeros(S, np.float32)), SamplerFlags())
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy(logits):
    temp = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    tokens, _ = sample(logits, _batch(temperature=temp), SamplerFlags(all_greedy=False))
    assert np.asarray(tokens)[0] == logits[0].argmax() and np.asarray(tokens)[2] == logits[2].argmax()


def test_seeded_rows_do_not_depend_on_the_batch(logits):
    flags = SamplerFlags(all_greedy=False)
    full, _ = sample(logits, _batch(), flags)
    # The same row alone (padded with other rows) samples the same token.
    alone_logits = np.stack([logits[2]] * S)
    seeds = np.full(S, 13, np.uint32)
    alone, _ = sample(alone_logits, _batch(seeds=seeds), flags)
    assert int(np.asarray(full)[2]) == int(np.asarray(alone)[0])


def test_sampling_follows_the_distribution():
    """Many positions of one row: empirical frequencies match softmax(logits / T)."""
    rows = 4000
    row = np.array([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4), np.float32)
    logits = np.tile(row, (rows, 1))
    batch = SamplingBatch(
        temperature=np.full(rows, 0.7, np.float32),
        seeds=np.full(rows, 5, np.uint32),
        positions=np.arange(rows, dtype=np.int32),
    )
    tokens, _ = sample(logits, batch, SamplerFlags(all_greedy=False))
    freq = np.bincount(np.asarray(tokens), minlength=V)[:4] / rows
    p = np.exp(row[:4] / 0.7)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


def _allowed_after_filters(row, top_k, top_p, min_p):
    order = np.argsort(-row, kind="stable")
    keep = np.zeros(V, bool)
    k = top_k if top_k > 0 else V
    probs = np.exp(row[order[:k]] - row[order[0]])
    probs /= probs.sum()
    mass = 0.0
    for idx, p in zip(order[:k], probs, strict=True):
        if mass >= top_p:
            break
        keep[idx] = True
        mass += p
    full = np.exp(row - row.max())
    full /= full.sum()
    keep &= full >= min_p * full.max()
    return keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (8, 0.9, 0.05)])
def test_top_k_top_p_min_p_only_sample_allowed_tokens(logits, top_k, top_p, min_p):
    rows = 512
    row = logits[1]
    batch = SamplingBatch(
        temperature=np.ones(rows, np.float32),
        seeds=np.full(rows, 3, np.uint32),
        positions=np.arange(rows, dtype=np.int32),
        top_k=np.full(rows, top_k, np.int32),
        top_p=np.full(rows, top_p, np.float32),
        min_p=np.full(rows, min_p, np.float32),
    )
    tokens, _ = sample(np.tile(row, (rows, 1)), batch, SamplerFlags(all_greedy=False, top_k_top_p=True))
    keep = _allowed_after_filters(row, top_k, top_p, min_p)
    seen = set(np.asarray(tokens).tolist())
    assert seen <= set(np.flatnonzero(keep).tolist())
    assert len(seen) > 1 or keep.sum() == 1


def test_penalties_match_numpy(logits):
    out_tokens = np.full((S, 6), -1, np.int32)
    out_tokens[0, :3] = [4, 4, 9]
    prompt_tokens = np.full((S, 6), -1, np.int32)
    prompt_tokens[0, :2] = [1, 9]
    batch = _batch(
        temperature=np.zeros(S, np.float32),
        presence_penalty=np.full(S, 0.5, np.float32),
        frequency_penalty=np.full(S, 0.25, np.float32),
        repetition_penalty=np.full(S, 1.5, np.float32),
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
    )
    from jaxllm.runner.sampler import _apply_penalties

    got = np.asarray(_apply_penalties(logits, batch))
    want = logits.copy()
    for tok in (1, 4, 9):  # seen in prompt or output: repetition penalty
        want[0, tok] = want[0, tok] / 1.5 if want[0, tok] > 0 else want[0, tok] * 1.5
    want[0, 4] -= 0.25 * 2 + 0.5
    want[0, 9] -= 0.25 * 1 + 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sparse_bias_and_allowed_only(logits):
    ids = np.full((S, 4), -1, np.int32)
    vals = np.zeros((S, 4), np.float32)
    ids[0, :1], vals[0, :1] = [7], [100.0]  # force token 7
    ids[1, :2] = [3, 5]  # row 1: only 3 or 5
    ids[2, :1], vals[2, :1] = [int(logits[2].argmax())], [-np.inf]  # ban the argmax
    allowed = np.array([False, True, False, False])
    batch = _batch(temperature=np.zeros(S, np.float32), bias_ids=ids, bias_values=vals, allowed_only=allowed)
    tokens = np.asarray(sample(logits, batch, SamplerFlags(sparse_bias=True))[0])
    assert tokens[0] == 7
    assert tokens[1] == (3 if logits[1, 3] > logits[1, 5] else 5)
    assert tokens[2] == np.argsort(-logits[2])[1]
    assert tokens[3] == logits[3].argmax()


def test_bitmask(logits):
    words = -(-V // 32)
    mask = np.full((S, words), -1, np.int32)
    mask[0] = 0
    mask[0, 1] = 1 << (40 - 32)  # row 0: only token 40
    tokens = np.asarray(sample(logits, _batch(temperature=np.zeros(S, np.float32), bitmask=mask),
                               SamplerFlags(bitmask=True))[0])
    assert tokens[0] == 40
    assert tokens[1] == logits[1].argmax()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_logprobs_are_raw_and_rank_the_sampled_token(logits):
    greedy = _batch(temperature=np.zeros(S, np.float32))
    _, out = sample(logits, greedy, SamplerFlags(logprobs=True, top_logprobs=20))
    lp = _log_softmax(logits)
    np.testing.assert_allclose(np.asarray(out.top_values), -np.sort(-lp, -1)[:, :20], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.top_ids)[:, 0], logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.chosen), lp.max(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.rank), 1)
    assert out.token_id_values is None


def test_the_whole_vocabulary_width_is_log_softmax_of_the_logits(logits):
    """--max-logprobs -1 compiles a width of the whole vocabulary: every id, most likely first."""
    width = LogprobWidths.of(-1, V).fitting([-1])
    assert width == V
    greedy = _batch(temperature=np.zeros(S, np.float32))
    _, out = sample(logits, greedy, SamplerFlags(logprobs=True, top_logprobs=width))
    lp = _log_softmax(logits)
    ids, values = np.asarray(out.top_ids), np.asarray(out.top_values)
    np.testing.assert_array_equal(np.sort(ids, -1), np.tile(np.arange(V), (S, 1)))
    np.testing.assert_allclose(values, np.take_along_axis(lp, ids, -1), atol=1e-5)
    assert (np.diff(values, axis=-1) <= 0).all()


def test_logprob_token_ids_read_those_ids_at_each_row(logits):
    wanted = np.full((S, 128), -1, np.int32)
    wanted[0, :3] = [7, 0, 49]
    wanted[2, :1] = [13]
    tokens, out = sample(logits, _batch(temperature=np.zeros(S, np.float32), logprob_token_ids=wanted),
                         SamplerFlags(logprobs=True, logprob_token_ids=True))
    lp = _log_softmax(logits)
    values = np.asarray(out.token_id_values)
    np.testing.assert_allclose(values[0, :3], lp[0, [7, 0, 49]], atol=1e-5)
    np.testing.assert_allclose(values[2, 0], lp[2, 13], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.chosen), lp[np.arange(S), np.asarray(tokens)], atol=1e-5)
    assert out.top_ids.shape == (S, 0)


@pytest.mark.parametrize(("max_logprobs", "counts", "width"), [
    (20, [0, 5, 20], 20),  # vLLM's default: one width
    (30, [3], 20),  # within OpenAI's cap: the narrow width
    (30, [3, 21], 30),
    (-1, [20], 20),
    (-1, [5, -1], V),  # the whole vocabulary
    (5, [5], 5),
    (1000, [200], V),  # a limit above the vocabulary
    (20, [], 0),  # only logprob_token_ids rows: no top-k
])
def test_a_step_compiles_the_narrowest_width_that_holds_its_requests(max_logprobs, counts, width):
    assert LogprobWidths.of(max_logprobs, V).fitting(counts) == width
