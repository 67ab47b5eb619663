"""MLA attention (pallas_kernels/mla_attention): references against dense numpy, the absorbed form
against the expanded form on the same weights, the XLA paths against the references, and the
Mosaic GPU kernel in the simulator and through the CUDA lowering (PTX, SMEM and speed only on a
GPU: bench/mla_attention.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_attention import (
    MlaXlaBlocks,
    gather_latents,
    mla_absorbed_reference,
    mla_absorbed_xla,
    mla_expanded_reference,
    mla_expanded_xla,
    write_latent_pages,
)
from pallas_kernels.mla_attention.mosaic_gpu import (
    MlaPlan,
    default_mla_plan,
    mla_absorbed_mosaic,
    mla_unsupported_reason,
)
from tests.kernels.ragged_batch import ragged_layout

SMALL_BLOCKS = MlaXlaBlocks(chunk_tokens=16, decode_block=2, tile_tokens=4, prefill_block=2)


def jitted(fn, **static):
    """An XLA path under one jit (eagerly, every op around its loops compiles on its own)."""
    return jax.jit(functools.partial(fn, **static), static_argnames=("sm_scale",))


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]  # live requests only
    kv_lens: tuple[int, ...]
    num_heads: int = 4
    rank: int = 32  # R (kv_lora_rank)
    rope_dim: int = 16  # Dr (qk_rope_head_dim)
    page_size: int = 8
    pages_per_seq: int = 8
    num_slots: int | None = None  # > len(q_lens): padded request slots
    num_tokens: int | None = None  # > sum(q_lens): padded tokens


CASES = {
    "decode": Case(q_lens=(1, 1, 1, 1), kv_lens=(5, 8, 17, 40)),
    "prefill": Case(q_lens=(21, 12), kv_lens=(21, 45)),
    # Decodes before and after a prefill chunk, padded slots and tokens.
    "mixed_padded": Case(q_lens=(1, 9, 1, 6), kv_lens=(40, 30, 17, 6), num_slots=6, num_tokens=24),
}


def make_batch(case: Case, dtype=jnp.float32, seed: int = 0):
    """(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs): random queries
    and pages, each slot's pages distinct, scattered ids in the pool."""
    rng = np.random.default_rng(seed)
    layout = ragged_layout(rng, case.q_lens, case.kv_lens, num_slots=case.num_slots, num_tokens=case.num_tokens,
                           pages_per_seq=case.pages_per_seq)
    q_latent = rng.standard_normal((layout.num_tokens, case.num_heads, case.rank))
    q_pe = rng.standard_normal((layout.num_tokens, case.num_heads, case.rope_dim))
    pages = rng.standard_normal((layout.num_pages, case.page_size, case.rank + case.rope_dim))
    return (jnp.asarray(q_latent, dtype), jnp.asarray(q_pe, dtype), jnp.asarray(pages, dtype), layout.kv_lens,
            layout.page_indices, layout.cu_q_lens, layout.num_seqs)


def dense_absorbed(batch, sm_scale: float) -> np.ndarray:
    """Per request in numpy: its latents in order, causal softmax of (q_latent . c_kv + q_pe . k_pe)."""
    q_latent, q_pe, pages, kv_lens, page_indices, cu_q_lens, num_seqs = (np.asarray(x, np.float64) for x in batch)
    rank = q_latent.shape[2]
    out = np.zeros_like(q_latent)
    for s in range(int(num_seqs[0])):
        start, end, kv_len = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        latents = pages[page_indices[s].astype(int)].reshape(-1, pages.shape[2])[:kv_len]
        for i, t in enumerate(range(start, end)):
            seen = latents[: kv_len - (end - start) + i + 1]
            logits = (q_latent[t] @ seen[:, :rank].T + q_pe[t] @ seen[:, rank:].T) * sm_scale  # [H, L]
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            out[t] = (w / w.sum(axis=1, keepdims=True)) @ seen[:, :rank]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_absorbed_reference_matches_dense_numpy(name):
    batch = make_batch(CASES[name])
    out = mla_absorbed_reference(*batch, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out), dense_absorbed(batch, 0.1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, blocks",
    [("decode", SMALL_BLOCKS), ("mixed_padded", SMALL_BLOCKS), ("mixed_padded", MlaXlaBlocks())],
    ids=["decode", "mixed_padded", "mixed_padded_default_blocks"],
)
def test_absorbed_xla_matches_reference(name, blocks):
    batch = make_batch(CASES[name])
    want = mla_absorbed_reference(*batch, sm_scale=0.1)
    got = jitted(mla_absorbed_xla, sm_scale=0.1, blocks=blocks)(*batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_absorbed_xla_bf16_matches_reference():
    batch = make_batch(CASES["decode"], dtype=jnp.bfloat16)
    want = mla_absorbed_reference(*batch, sm_scale=0.1).astype(jnp.float32)
    got = jitted(mla_absorbed_xla, sm_scale=0.1, blocks=SMALL_BLOCKS)(*batch).astype(jnp.float32)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def expanded_inputs(batch, w_uk: jax.Array, w_uv: jax.Array, q_nope: jax.Array):
    """The expanded form of a batch: per-head K = [c_kv W_UK[h], k_pe], V = c_kv W_UV[h] over each
    request's whole context (gathered from the pages), Q = [q_nope, q_pe]."""
    _, q_pe, pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch
    rank = w_uk.shape[1]
    live = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    cu_kv_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.where(live, kv_lens, 0))]).astype(jnp.int32)
    latents = gather_latents(pages, page_indices, cu_kv_lens, int(np.sum(np.asarray(kv_lens))))  # [Tk, R + Dr]
    c_kv, k_pe = latents[:, :rank], latents[:, rank:]
    k_nope = jnp.einsum("lr,hrn->lhn", c_kv, w_uk)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, None], (k_pe.shape[0], w_uk.shape[0], k_pe.shape[1]))], -1)
    v = jnp.einsum("lr,hrv->lhv", c_kv, w_uv)
    return jnp.concatenate([q_nope, q_pe], -1), k, v, cu_q_lens, cu_kv_lens, num_seqs


@pytest.mark.parametrize("name", ["mixed_padded"])
def test_absorbed_form_equals_expanded_form(name):
    """The key property: attention over latents with W_UK folded into the query and W_UV applied
    to the output equals attention over the per-head K/V the latents expand to."""
    case = CASES[name]
    batch = make_batch(case)
    rng = np.random.default_rng(1)
    nope_dim, v_dim = 12, 10
    w_uk = jnp.asarray(rng.standard_normal((case.num_heads, case.rank, nope_dim)) / case.rank**0.5, jnp.float32)
    w_uv = jnp.asarray(rng.standard_normal((case.num_heads, case.rank, v_dim)) / case.rank**0.5, jnp.float32)
    q_nope = jnp.asarray(rng.standard_normal((batch[0].shape[0], case.num_heads, nope_dim)), jnp.float32)
    q_latent = jnp.einsum("thn,hrn->thr", q_nope, w_uk)
    absorbed_batch = (q_latent, *batch[1:])
    sm_scale = (nope_dim + case.rope_dim) ** -0.5

    expanded = expanded_inputs(absorbed_batch, w_uk, w_uv, q_nope)
    want = mla_expanded_reference(*expanded, sm_scale=sm_scale)  # [T, H, Dv]
    for absorbed in (mla_absorbed_reference, jitted(mla_absorbed_xla)):
        out_latent = absorbed(*absorbed_batch, sm_scale=sm_scale)
        got = jnp.einsum("thr,hrv->thv", out_latent, w_uv)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    got = jitted(mla_expanded_xla, sm_scale=sm_scale, blocks=SMALL_BLOCKS)(*expanded)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_expanded_xla_matches_reference_with_padding():
    """Distinct QK (24) and V (10) head sizes, padded slots and tokens, and key rows past the last
    request's."""
    rng = np.random.default_rng(2)
    q_lens, kv_lens = [1, 7, 0, 0], [9, 20, 0, 0]
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu_kv = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((12, 3, 24)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((33, 3, 24)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((33, 3, 10)), jnp.float32)
    args = (q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_kv), jnp.asarray([2], jnp.int32))
    want = mla_expanded_reference(*args, sm_scale=0.2)
    assert not bool(jnp.any(want[8:]))
    got = jitted(mla_expanded_xla, sm_scale=0.2, blocks=SMALL_BLOCKS)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_write_latent_pages_places_rows_and_drops_padding():
    pages = jnp.zeros((3, 4, 6), jnp.bfloat16)
    latent = jnp.arange(18, dtype=jnp.float32).reshape(3, 6) + 1
    slots = jnp.asarray([5, 10, 12], jnp.int32)  # page 1 offset 1, page 2 offset 2, padding (past 3 x 4)
    out = np.asarray(write_latent_pages(pages, latent, slots).astype(jnp.float32))
    np.testing.assert_array_equal(out[1, 1], np.asarray(latent[0]))
    np.testing.assert_array_equal(out[2, 2], np.asarray(latent[1]))
    assert np.count_nonzero(out.any(axis=-1)) == 2


def test_gather_latents_reads_each_request_in_order():
    case = CASES["mixed_padded"]
    _, _, pages, kv_lens, page_indices, _, _ = make_batch(case)
    cu_kv = jnp.asarray(np.concatenate([[0], np.cumsum(np.asarray(kv_lens))]), jnp.int32)
    rows = gather_latents(pages, page_indices, cu_kv, int(cu_kv[-1]) + 3)
    p = np.asarray(pages)
    for s, kv_len in enumerate(np.asarray(kv_lens)):
        want = p[np.asarray(page_indices[s])].reshape(-1, p.shape[2])[:kv_len]
        np.testing.assert_array_equal(np.asarray(rows[int(cu_kv[s]) : int(cu_kv[s + 1])]), want)
    assert not bool(jnp.any(rows[int(cu_kv[-1]) :]))


# ---- the Mosaic GPU kernel (absorbed form) -------------------------------------------------------

# Simulated at R = 128 (the simulator is slow at 512; the CUDA lowering below takes 512).
KERNEL_CASES = {
    # Decodes, 16 heads (DeepSeek-V2-Lite): 4 tokens x 16 heads per 64-row tile; contexts within
    # one block, across several, and on a block boundary.
    "decode": (Case(q_lens=(1, 1, 1), kv_lens=(5, 64, 150), num_heads=16, rank=128, rope_dim=64, page_size=16,
                    pages_per_seq=10), None),
    # A 6-token chunk between decodes (tiles of 4 tokens), padded slots and tokens, 32-token pages.
    "mixed_padded": (Case(q_lens=(1, 6, 1), kv_lens=(40, 70, 9), num_heads=16, rank=128, rope_dim=64, page_size=32,
                          pages_per_seq=3, num_slots=4, num_tokens=16), None),
    # Split-K over 3: contexts of 1 or 2 blocks per split, one split empty; 8 heads (8-token tiles).
    "split_k": (Case(q_lens=(1, 1), kv_lens=(100, 190), num_heads=8, rank=128, rope_dim=64, page_size=32,
                     pages_per_seq=6), MlaPlan(kv_splits=3)),
    # NOTE: 128 heads (two 64-head groups, one token per tile) are checked by the CUDA lowering
    # below and on the GPU (bench/mla_attention.py): simulating their ~70 CTAs takes ~20 s.
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_simulated_kernel_matches_reference(simulator, name):
    case, plan = KERNEL_CASES[name]
    batch = make_batch(case, dtype=jnp.bfloat16)
    want = mla_absorbed_reference(*batch, sm_scale=0.05).astype(jnp.float32)
    simulator.reset()
    got = jax.block_until_ready(mla_absorbed_mosaic(*batch, sm_scale=0.05, plan=plan, interpret=simulator.params()))
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    got = got.astype(jnp.float32)
    assert bool(jnp.isfinite(got).all()), "unwritten (NaN-poisoned) or non-finite outputs"
    padded = int(batch[5][len(case.q_lens)])
    assert not bool(jnp.any(got[padded:])), "padded tokens must be zeros"
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2
    assert not simulator.races_found()


@pytest.mark.parametrize(
    "num_heads, page_size, q_lens, plan",
    [
        (16, 16, (1, 1), None),  # DeepSeek-V2-Lite, one device
        (16, 64, (1, 1), None),
        (16, 16, (1, 1), MlaPlan(kv_splits=4)),
        (16, 16, (1, 9), None),  # a chunk: 3 tiles of 4 tokens
        (128, 16, (1, 1), None),  # DeepSeek-V2/V3, one device
        (128, 64, (1, 1), MlaPlan(kv_splits=2)),
        (8, 16, (1, 1), None),
    ],
)
def test_kernel_lowers_for_cuda_at_deepseek_shapes(num_heads, page_size, q_lens, plan):
    """R 512, Dr 64: the lowering also checks the 227 KiB SMEM budget."""
    case = Case(q_lens=q_lens, kv_lens=(300, 200), num_heads=num_heads, rank=512, rope_dim=64, page_size=page_size,
                pages_per_seq=-(-300 // page_size))
    batch = make_batch(case, dtype=jnp.bfloat16)
    fn = jax.jit(lambda *b: mla_absorbed_mosaic(*b, sm_scale=0.05, plan=plan))
    assert "mosaic_gpu" in fn.trace(*batch).lower(lowering_platforms=("cuda",)).as_text()


def test_three_latent_slots_overflow_smem():
    """The SMEM check is live: a third 72 KiB latent slot does not fit next to the queries."""
    case = Case(q_lens=(1,), kv_lens=(300,), num_heads=16, rank=512, rope_dim=64, page_size=16, pages_per_seq=19)
    batch = make_batch(case, dtype=jnp.bfloat16)
    fn = jax.jit(lambda *b: mla_absorbed_mosaic(*b, sm_scale=0.05, plan=MlaPlan(num_slots=3)))
    with pytest.raises(ValueError, match="shared memory"):
        fn.trace(*batch).lower(lowering_platforms=("cuda",))


def test_unsupported_reasons():
    ok = dict(dtype=jnp.bfloat16, num_heads=16, kv_lora_rank=512, rope_dim=64, page_size=16)
    assert mla_unsupported_reason(**ok) is None
    assert mla_unsupported_reason(**{**ok, "num_heads": 128}) is None
    assert "dtype" in mla_unsupported_reason(**{**ok, "dtype": jnp.float32})
    assert "heads" in mla_unsupported_reason(**{**ok, "num_heads": 4})  # V2-Lite at tp 4
    assert "heads" in mla_unsupported_reason(**{**ok, "num_heads": 96})
    assert "kv_lora_rank" in mla_unsupported_reason(**{**ok, "kv_lora_rank": 320})
    assert "rope" in mla_unsupported_reason(**{**ok, "rope_dim": 32})
    assert "SMEM" in mla_unsupported_reason(**{**ok, "rope_dim": 128})
    assert "page_size" in mla_unsupported_reason(**{**ok, "page_size": 12})


def test_split_k_keeps_few_long_requests_in_one_wave():
    """132 SMs (the CPU stand-in for an H100): items x splits fill at most one wave."""
    assert default_mla_plan(num_items=32, max_kv_len=2048).kv_splits == 4
    assert default_mla_plan(num_items=4, max_kv_len=8192).kv_splits == 32
    assert default_mla_plan(num_items=128, max_kv_len=2048).kv_splits == 1  # one wave already
    assert default_mla_plan(num_items=4, max_kv_len=256).kv_splits == 1  # too short to split
