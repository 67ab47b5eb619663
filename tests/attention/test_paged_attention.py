"""The XLA path equals the reference on random ragged batches; the K/V write lands in its pages."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    AttentionParams,
    XlaBlockSizes,
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
    write_kv_pages,
)


def ragged_batch(rng, q_lens, kv_lens, *, num_slots, num_tokens, hq=8, hkv=2, d=16, page=16, num_pages=64):
    """Random inputs in the layout of common.py; slots past len(q_lens) are padding."""
    assert len(q_lens) <= num_slots and sum(q_lens) <= num_tokens
    pages_per_seq = max(-(-k // page) for k in kv_lens) if kv_lens else 1
    cu = np.zeros(num_slots + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    lens = np.zeros(num_slots, np.int32)
    lens[: len(kv_lens)] = kv_lens
    perm = rng.permutation(num_pages).astype(np.int32)
    page_indices = np.zeros((num_slots, pages_per_seq), np.int32)
    for s in range(len(q_lens)):
        page_indices[s] = perm[s * pages_per_seq : (s + 1) * pages_per_seq]
    q = rng.standard_normal((num_tokens, hq, d)).astype(np.float32)
    kv = rng.standard_normal((2, hkv, num_pages, page, d)).astype(np.float32)
    return q, kv, lens, page_indices, cu, np.array([len(q_lens)], np.int32)


CASES = {
    "decode_only": ([1, 1, 1, 1], [5, 16, 17, 40]),
    "prefill_only": ([20, 33], [20, 33]),  # kv_len == q_len
    "mixed": ([1, 12, 1, 30], [64, 40, 1, 47]),
    "chunk_onto_cache": ([16], [48]),  # on page boundaries
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window,cap", [(None, None), (8, None), (None, 5.0)])
def test_xla_equals_reference(case, window, cap):
    rng = np.random.default_rng(hash(case) % 1000)
    q_lens, kv_lens = CASES[case]
    args = ragged_batch(rng, q_lens, kv_lens, num_slots=6, num_tokens=64)
    params = AttentionParams(sm_scale=0.25, sliding_window=window, soft_cap=cap)
    ref = np.asarray(ragged_paged_attention_reference(*args, params))
    out = np.asarray(ragged_paged_attention_xla(*args, params))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    real = sum(q_lens)
    assert np.all(out[real:] == 0), "padded tokens must give zeros"
    assert np.abs(ref[:real]).max() > 0


def test_reference_against_numpy_softmax():
    """An independent numpy oracle for one token of a GQA prefill."""
    rng = np.random.default_rng(3)
    q, kv, lens, pages, cu, ns = ragged_batch(rng, [5, 9], [7, 9], num_slots=2, num_tokens=16, page=4, num_pages=16)
    out = np.asarray(ragged_paged_attention_reference(q, kv, lens, pages, cu, ns, AttentionParams(sm_scale=0.25)))
    t, h, group = 3, 5, 4  # token 3 of request 0 sits at position 7 - 5 + 3 = 5
    k = kv[0][h // group][pages[0]].reshape(-1, 16)[:6]
    v = kv[1][h // group][pages[0]].reshape(-1, 16)[:6]
    logits = k @ q[t, h] * 0.25
    w = np.exp(logits - logits.max())
    np.testing.assert_allclose(out[t, h], (w / w.sum()) @ v, atol=1e-5)


def test_reference_with_sinks_against_numpy_softmax():
    """The sink as HF's gpt-oss adds it: one more logit per head after the scale, no value;
    every token of a windowed GQA prefill onto a cache, checked by a plain numpy loop."""
    rng = np.random.default_rng(5)
    q, kv, lens, pages, cu, ns = ragged_batch(rng, [5], [11], num_slots=1, num_tokens=8, page=4, num_pages=8)
    sinks = rng.standard_normal(8).astype(np.float32) * 2
    params = AttentionParams(sm_scale=0.25, sliding_window=4)
    out = np.asarray(ragged_paged_attention_reference(q, kv, lens, pages, cu, ns, params, sinks=sinks))
    group = 4
    for t in range(5):
        pos = 11 - 5 + t
        for h in range(8):
            k = kv[0][h // group][pages[0]].reshape(-1, 16)[pos - 3 : pos + 1]
            v = kv[1][h // group][pages[0]].reshape(-1, 16)[pos - 3 : pos + 1]
            logits = np.append(k @ q[t, h] * 0.25, sinks[h])
            w = np.exp(logits - logits.max())
            np.testing.assert_allclose(out[t, h], (w[:-1] / w.sum()) @ v, atol=1e-5)
    assert not np.any(out[5:])


# gpt-oss's head shape per KV head pair: GQA 8, head_dim 64.
GPT_OSS_HEADS = dict(hq=16, hkv=2, d=64)


@pytest.mark.parametrize("case,window", [("decode_only", 24), ("mixed", None), ("mixed", 24)])
def test_xla_with_sinks_equals_reference(case, window):
    rng = np.random.default_rng(11)
    q_lens, kv_lens = CASES[case]
    args = ragged_batch(rng, q_lens, kv_lens, num_slots=6, num_tokens=64, **GPT_OSS_HEADS)
    sinks = (rng.standard_normal(GPT_OSS_HEADS["hq"]) * 3).astype(np.float32)  # some beat every key
    params = AttentionParams(sm_scale=0.125, sliding_window=window)
    ref = np.asarray(ragged_paged_attention_reference(*args, params, sinks=sinks))
    out = np.asarray(ragged_paged_attention_xla(*args, params, sinks=sinks))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert np.all(out[sum(q_lens):] == 0), "padded tokens must give zeros"
    plain = np.asarray(ragged_paged_attention_reference(*args, params))
    assert np.abs(plain - ref).max() > 1e-2, "the sinks changed nothing: the case cannot tell"


def test_xla_sliding_window_reads_only_the_window():
    """Pages wholly before every query's window hold NaN: a path that gathered them would give
    NaN (a masked weight 0 times NaN), so finite equality with the clean reference shows they are
    never read. Decodes of very different contexts share a decode block (each row starts at its
    own window), a prefill chunk spans several tiles and chunks."""
    blocks = XlaBlockSizes(decode_block=4, tile_tokens=8, chunk_tokens=64)
    window, page = 20, 16
    q_lens, kv_lens = [1, 1, 1, 1, 19], [30, 300, 17, 180, 250]
    rng = np.random.default_rng(9)
    q, kv, lens, pages, cu, ns = ragged_batch(rng, q_lens, kv_lens, num_slots=6, num_tokens=32, page=page,
                                              num_pages=100, **GPT_OSS_HEADS)
    sinks = rng.standard_normal(GPT_OSS_HEADS["hq"]).astype(np.float32)
    params = AttentionParams(sm_scale=0.125, sliding_window=window)
    ref = np.asarray(ragged_paged_attention_reference(q, kv, lens, pages, cu, ns, params, sinks=sinks))
    poisoned = kv.copy()
    unread = 0
    for s, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens, strict=True)):
        first_visible = max(kv_len - q_len - window + 1, 0)
        before = pages[s][: first_visible // page]
        poisoned[:, :, before] = np.nan
        unread += len(before)
    assert unread >= 40  # most of the context lies outside the window
    out = np.asarray(ragged_paged_attention_xla(q, poisoned, lens, pages, cu, ns, params, sinks=sinks,
                                                blocks=blocks))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_write_kv_pages_writes_slots_and_drops_padding():
    rng = np.random.default_rng(4)
    kv = np.zeros((2, 2, 4, 4, 8), np.float32)
    k = rng.standard_normal((3, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 2, 8)).astype(np.float32)
    slots = np.array([9, 2, 16], np.int32)  # page 2 offset 1, page 0 offset 2, padding (out of range)
    out = np.asarray(write_kv_pages(kv, k, v, slots))
    np.testing.assert_array_equal(out[0, :, 2, 1], k[0])
    np.testing.assert_array_equal(out[1, :, 0, 2], v[1])
    assert np.count_nonzero(out) == 2 * 2 * 2 * 8  # only the two real tokens were written


@pytest.mark.parametrize("case", ["decodes_after_prefill", "many_blocks", "window"])
def test_xla_loops_with_small_blocks(case):
    """Small decode blocks, tiles and context chunks, so every loop runs many iterations, tiles
    split requests and contexts span several chunks."""
    blocks = XlaBlockSizes(decode_block=4, tile_tokens=8, chunk_tokens=16)  # one page per chunk
    q_lens, kv_lens = {
        "decodes_after_prefill": ([1, 1, 19, 1, 1, 3], [9, 30, 40, 2, 64, 3]),
        "many_blocks": ([1] * 9 + [21], [5, 9, 13, 17, 21, 25, 29, 33, 37, 50]),
        "window": ([1, 1, 30], [60, 17, 45]),
    }[case]
    rng = np.random.default_rng(7)
    args = ragged_batch(rng, q_lens, kv_lens, num_slots=12, num_tokens=64, page=16)
    params = AttentionParams(sm_scale=0.25, sliding_window=20 if case == "window" else None,
                             soft_cap=4.0 if case == "window" else None)
    ref = np.asarray(ragged_paged_attention_reference(*args, params))
    out = np.asarray(ragged_paged_attention_xla(*args, params, blocks=blocks))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
