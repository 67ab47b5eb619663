"""The Mosaic GPU ragged paged attention kernel against the reference, on CPU.

Two checks per kernel variant:
  - the Mosaic GPU simulator runs it (race detector on, every fresh buffer, the output too,
    filled with NaN so an element the kernel never writes fails the finite check);
  - the real CUDA lowering accepts it (`lower(lowering_platforms=("cuda",))`), which catches
    layout and tiling errors the simulator does not model.
PTX compilation, SMEM capacity and speed are only testable on the GPU (bench/kernels.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention.common import AttentionParams, quantize_fp8
from pallas_kernels.ragged_paged_attention.mosaic_gpu import (
    WORK_COLUMNS,
    LaunchPlan,
    WorkColumn,
    cta_bounds,
    default_plan,
    mosaic_unsupported_reason,
    ragged_paged_attention_mosaic,
    work_list,
)
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from tests.kernels import mgpu_simulator
from tests.kernels.ragged_batch import ragged_layout

# bf16 inputs, fp32 accumulation: ||out - ref|| / ||ref|| lands near 2e-3 (one bf16 rounding
# of P and of the output); a wrong mask or a missed block is O(0.1) or more.
REL_TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]  # live requests only
    kv_lens: tuple[int, ...]
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    pages_per_seq: int = 8
    num_slots: int | None = None  # > len(q_lens): padded (empty) request slots
    num_tokens: int | None = None  # > sum(q_lens): padded tokens
    dtype: type = jnp.bfloat16
    params: AttentionParams = AttentionParams(sm_scale=0.125)
    with_sinks: bool = False  # gpt-oss's learned sink per query head
    fp8_pages: bool = False  # e4m3 pages holding K / k_scale and V / v_scale (common.py)


def make_sinks(case: Case, seed: int = 1) -> jax.Array | None:
    """[Hq] f32 sinks around the logits' scale (some heads' sinks outweigh every key), or None."""
    if not case.with_sinks:
        return None
    return jnp.asarray(np.random.default_rng(seed).standard_normal(case.num_q_heads) * 2, jnp.float32)


def make_batch(case: Case, seed: int = 0):
    """Random q and pages; each slot's pages are distinct, scattered ids in the pool."""
    rng = np.random.default_rng(seed)
    layout = ragged_layout(rng, case.q_lens, case.kv_lens, num_slots=case.num_slots, num_tokens=case.num_tokens,
                           pages_per_seq=case.pages_per_seq)
    q = rng.standard_normal((layout.num_tokens, case.num_q_heads, case.head_dim))
    kv = rng.standard_normal((2, case.num_kv_heads, layout.num_pages, case.page_size, case.head_dim))
    if case.fp8_pages:
        kv = jnp.stack([quantize_fp8(jnp.asarray(kv[0]), case.params.k_scale),
                        quantize_fp8(jnp.asarray(kv[1]), case.params.v_scale)])
    return (jnp.asarray(q, case.dtype), kv if case.fp8_pages else jnp.asarray(kv, case.dtype), layout.kv_lens,
            layout.page_indices, layout.cu_q_lens, layout.num_seqs)


CASES = {
    # Decodes only; KV lengths on (16, 48) and off (5, 33) page boundaries.
    "decode": Case(q_lens=(1, 1, 1, 1), kv_lens=(5, 16, 33, 48)),
    # Prefill only, d=128, GQA 4: a fresh prompt (kv_len == q_len) and a chunk onto a cache.
    "prefill": Case(q_lens=(21, 12), kv_lens=(21, 45), num_q_heads=8, num_kv_heads=2, head_dim=128, pages_per_seq=4),
    # Mixed, with padded request slots and padded tokens past the last request; GQA 3 (48 of
    # the 64 wgmma rows used).
    "mixed_padded": Case(q_lens=(1, 9, 1), kv_lens=(40, 64, 17), num_q_heads=6, num_slots=5, num_tokens=24),
    # Sliding window and logit soft-cap; MHA (GQA 1) and 32-token pages.
    "window_softcap": Case(
        q_lens=(10, 1),
        kv_lens=(70, 50),
        num_q_heads=2,
        num_kv_heads=2,
        page_size=32,
        pages_per_seq=3,
        params=AttentionParams(sm_scale=0.1, sliding_window=24, soft_cap=8.0),
    ),
    # fp16, GQA 8 over one KV head.
    "fp16_gqa8": Case(q_lens=(3, 1), kv_lens=(19, 60), num_q_heads=8, num_kv_heads=1, dtype=jnp.float16),
    # GQA 16 (token-major rows, 4 tokens per tile): GLM-4-9B's heads per device at tp=2 (16 q /
    # 1 kv, d=128), decodes: the persistent one-consumer plan; with sinks, so token-major rows
    # find their heads' sinks too.
    "gqa16_decode": Case(
        q_lens=(1, 1, 1), kv_lens=(5, 16, 70), num_q_heads=16, num_kv_heads=1, head_dim=128, with_sinks=True
    ),
    # GLM-4-9B's heads at tp=1 (32 q / 2 kv), a prefill chunk between decodes, padded slots and
    # tokens: the ping-pong prefill plan, tiles starting mid-window.
    "gqa16_mixed_padded": Case(
        q_lens=(1, 9, 1), kv_lens=(40, 64, 17), num_q_heads=32, num_kv_heads=2, head_dim=128, num_slots=5, num_tokens=24
    ),
    # gpt-oss's heads (GQA 8, d=64) with sinks and a sliding window: decodes (the persistent
    # plan), one past the window and one inside it.
    "sinks_decode": Case(
        q_lens=(1, 1),
        kv_lens=(5, 70),
        num_q_heads=8,
        num_kv_heads=1,
        pages_per_seq=5,
        params=AttentionParams(sm_scale=0.125, sliding_window=32),
        with_sinks=True,
    ),
    # The same heads with sinks, a prefill chunk after a decode and a padded slot and tokens:
    # the ping-pong prefill plan.
    "sinks_mixed": Case(
        q_lens=(1, 9), kv_lens=(40, 20), num_q_heads=8, num_kv_heads=1, pages_per_seq=3, num_slots=3, num_tokens=16,
        with_sinks=True,
    ),
    # FP8 pages with scales far from 1 (a scale applied twice, or not at all, shows): decodes (the
    # persistent plan), and a mixed batch at d=128 (two ping-pong consumers, each upcasting).
    "fp8_decode": Case(q_lens=(1, 1), kv_lens=(5, 40), pages_per_seq=3, fp8_pages=True,
                       params=AttentionParams(sm_scale=0.125, k_scale=0.25, v_scale=4.0)),
    "fp8_mixed": Case(q_lens=(1, 21), kv_lens=(40, 45), num_q_heads=4, num_kv_heads=1, head_dim=128, pages_per_seq=3,
                      num_slots=3, num_tokens=24, fp8_pages=True,
                      params=AttentionParams(sm_scale=0.1, k_scale=0.5, v_scale=3.0)),
}


def test_simulator_api_is_where_the_tests_look():
    """jax's Mosaic GPU simulator is a private API: when a jax release moves any of it, this
    test (and every simulator test) fails naming what moved, rather than the tests skipping."""
    assert not mgpu_simulator.problems(), "\n".join(mgpu_simulator.problems())
    assert mgpu_simulator.params().detect_races


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_simulated(simulator, case: Case, plan=None) -> None:
    """Run the kernel (default plan, or `plan`) in the simulator and compare it with the reference."""
    batch = make_batch(case)
    sinks = make_sinks(case)
    ref = ragged_paged_attention_reference(*batch, case.params, sinks=sinks)
    simulator.reset()
    out = ragged_paged_attention_mosaic(*batch, case.params, sinks=sinks, plan=plan, interpret=simulator.params())
    out = jax.block_until_ready(out)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "unwritten (NaN-poisoned) or non-finite outputs"
    padded = int(batch[4][len(case.q_lens)])
    assert not bool(jnp.any(out[padded:])), "padded tokens must be zeros"
    assert relative_error(out, ref) < REL_TOL[case.dtype]
    assert not simulator.races_found()


@pytest.mark.parametrize("name", list(CASES))
def test_simulated_kernel_matches_reference(simulator, name):
    check_simulated(simulator, CASES[name])


def test_simulated_split_k_matches_reference(simulator):
    """Long decodes with few requests: each tile's KV range split into 3 work rows, merged in jnp."""
    case = Case(q_lens=(1, 1), kv_lens=(150, 200), num_q_heads=4, num_kv_heads=1, pages_per_seq=16)
    check_simulated(simulator, case, LaunchPlan(tokens_per_tile=16, pages_per_block=4, num_slots=2, kv_splits=3))


# Persistent CTAs: with 2-3 CTAs every CTA runs several items (work row x KV head) one after
# the other through one K/V ring, its next item's queries loading ahead.
# Consumer 0 of the second and third tiles owns no tokens (they start at token 40) yet must pass
# their K/V blocks on and keep the ping-pong meetings.
IDLE_FIRST_CONSUMER = Case(q_lens=(34, 6), kv_lens=(34, 60), num_q_heads=8, num_kv_heads=2, head_dim=128)
FEW_CTA_CASES = {
    "decode": (CASES["decode"], LaunchPlan(tokens_per_tile=16, pages_per_block=4, num_slots=2, max_ctas=3)),
    "decode_128_keys": (CASES["decode"], LaunchPlan(tokens_per_tile=16, pages_per_block=8, num_slots=2, max_ctas=3)),
    # A decode item leaves the second consumer without tokens.
    "mixed_pingpong": (
        CASES["mixed_padded"],
        LaunchPlan(tokens_per_tile=16, pages_per_block=4, num_slots=2, consumers=2, pingpong=True, max_ctas=3),
    ),
    "idle_first_consumer": (
        IDLE_FIRST_CONSUMER,
        LaunchPlan(tokens_per_tile=16, pages_per_block=4, num_slots=2, consumers=2, pingpong=True, max_ctas=2),
    ),
    # Split-K rows of several tiles on one CTA reuse its O and LSE staging.
    "split_k": (
        Case(q_lens=(1, 1), kv_lens=(150, 200), num_q_heads=4, num_kv_heads=1, pages_per_seq=16),
        LaunchPlan(tokens_per_tile=16, pages_per_block=4, num_slots=2, kv_splits=3, max_ctas=2),
    ),
    # The same at GQA 16, with a sliding window: token-major O and LSE stores; with sinks, which
    # split-K adds in the merge.
    "split_k_gqa16_window": (
        Case(
            q_lens=(1, 1),
            kv_lens=(150, 200),
            num_q_heads=16,
            num_kv_heads=1,
            pages_per_seq=16,
            params=AttentionParams(sm_scale=0.125, sliding_window=120),
            with_sinks=True,
        ),
        LaunchPlan(tokens_per_tile=4, pages_per_block=4, num_slots=2, kv_splits=3, max_ctas=2),
    ),
}


@pytest.mark.parametrize("name", list(FEW_CTA_CASES))
def test_simulated_few_ctas_match_reference(simulator, name):
    check_simulated(simulator, *FEW_CTA_CASES[name])


def test_simulated_idle_first_consumer_one_item_per_cta(simulator):
    check_simulated(simulator, IDLE_FIRST_CONSUMER)  # the default prefill plan: one item per CTA


@pytest.mark.parametrize("name", ["decode", "mixed_pingpong", "split_k_gqa16_window"])
def test_few_ctas_lower_for_cuda(name):
    assert "mosaic_gpu" in _lower_for_cuda(*FEW_CTA_CASES[name])


def test_cta_bounds_balance_cost_and_skip_empty_rows():
    # Rows: a 2-block item, a 10-block item, a 0-block item with tokens (padding), 2 empty rows.
    work = np.zeros((5, WORK_COLUMNS), np.int32)
    work[:3, WorkColumn.COUNT] = (1, 1, 4)
    work[:3, WorkColumn.KV_END] = (2, 10, 0)
    bounds = np.asarray(cta_bounds(jnp.asarray(work), num_kv_heads=2, num_ctas=4, persistent=True))
    # Item costs (blocks + 1), two heads each: 3 3 11 11 1 1, then 0 0 0 0 (never visited).
    assert bounds[0] == 0 and bounds[-1] == 6
    assert (np.diff(bounds) >= 0).all()
    costs = np.array([3, 3, 11, 11, 1, 1])
    per_cta = [costs[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert sum(per_cta) == costs.sum() and max(per_cta) <= 13  # the two 11-block heads apart
    one_each = cta_bounds(jnp.asarray(work), num_kv_heads=2, num_ctas=10, persistent=False)
    assert np.asarray(one_each).tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6]


def test_work_list_and_cta_bounds_have_no_loops():
    """Both run before the kernel (once per step: XLA merges the layers' copies). A while loop
    there (jnp.searchsorted's default binary search) is ~log2(N) rounds of tiny GPU kernels."""
    batch = make_batch(Case(q_lens=(1,) * 8, kv_lens=(300,) * 8, num_kv_heads=2, pages_per_seq=20))
    _, _, kv_lens, _, cu_q_lens, num_seqs = batch

    def prologue(cu_q_lens, kv_lens, num_seqs):
        work = work_list(cu_q_lens, kv_lens, num_seqs, num_tokens=16, tokens_per_tile=16, block_kv=128,
                         sliding_window=None)
        return work, cta_bounds(work, num_kv_heads=2, num_ctas=132, persistent=True)

    hlo = jax.jit(prologue).lower(cu_q_lens, kv_lens, num_seqs).as_text()
    assert "while" not in hlo and "stablehlo.case" not in hlo


def test_split_k_chosen_for_few_long_decodes():
    few = dict(num_kv_heads=8, max_kv_len=8192, group=4, page_size=16, head_dim=128)
    assert default_plan(num_tokens=4, num_slots=4, **few).kv_splits > 1
    assert default_plan(num_tokens=128, num_slots=128, **few).kv_splits == 1  # enough tiles already
    assert default_plan(num_tokens=2048, num_slots=4, **few).kv_splits == 1  # prefill
    assert default_plan(num_tokens=4, num_slots=4, **few, sliding_window=128).kv_splits == 1  # a short range


def _lower_for_cuda(case: Case, plan=None) -> str:
    """The kernel's CUDA lowering text (default plan, or `plan`)."""
    batch = make_batch(case)
    fn = jax.jit(lambda *args, sinks: ragged_paged_attention_mosaic(*args, case.params, sinks=sinks, plan=plan))
    return fn.trace(*batch, sinks=make_sinks(case)).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_for_cuda(name):
    assert "mosaic_gpu" in _lower_for_cuda(CASES[name])


@pytest.mark.parametrize("fp8_pages", [False, True], ids=["bf16_pages", "fp8_pages"])
def test_split_k_lowers_for_cuda(fp8_pages):
    case = Case(q_lens=(1, 1), kv_lens=(4000, 9000), num_q_heads=32, num_kv_heads=8, head_dim=128, pages_per_seq=600,
                fp8_pages=fp8_pages)
    assert (
        default_plan(
            num_tokens=2, num_slots=2, num_kv_heads=8, max_kv_len=9600, group=4, page_size=16, head_dim=128
        ).kv_splits
        > 1
    )
    assert "mosaic_gpu" in _lower_for_cuda(case)


@pytest.mark.parametrize("q_lens", [(1, 1), (1, 40)], ids=["decode", "mixed"])
@pytest.mark.parametrize(
    "group, head_dim, page_size",
    [
        (1, 128, 64),
        (2, 64, 16),
        (4, 128, 16),
        (7, 128, 16),
        (8, 64, 32),
        (8, 128, 16),
        (16, 128, 16),
        (16, 64, 32),
        (64, 64, 16),
    ],
)
def test_variants_lower_for_cuda(group, head_dim, page_size, q_lens):
    """Every default plan lowers, and fits the 227 KiB of SMEM (Mosaic checks it while lowering)."""
    case = Case(
        q_lens=q_lens,
        kv_lens=(300, 200),
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        page_size=page_size,
        pages_per_seq=-(-300 // page_size),
    )
    assert "mosaic_gpu" in _lower_for_cuda(case)


@pytest.mark.parametrize("n", [16, 4])  # head-major tiles (G <= 8), token-major (G = 16)
def test_work_list_covers_every_token_once(n):
    cu_q_lens = jnp.asarray([0, 1, 19, 20, 61, 61], jnp.int32)  # slot 4 is padding
    kv_lens = jnp.asarray([7, 18, 300, 41, 0], jnp.int32)
    num_tokens, block_kv = 72, 64
    work = np.asarray(
        work_list(
            cu_q_lens,
            kv_lens,
            jnp.asarray([4], jnp.int32),
            num_tokens=num_tokens,
            tokens_per_tile=n,
            block_kv=block_kv,
            sliding_window=None,
        )
    )
    owner = np.zeros(num_tokens, int)
    for _seq, token, count, _pos, kv_start, kv_end, mask_from, load_from, _split in work:
        owner[token : token + count] += 1
        if count:
            assert load_from % min(8, n) == 0 and load_from <= token and token + count <= load_from + n
            assert kv_start <= mask_from <= kv_end
    assert (owner == 1).all()
    real = work[work[:, WorkColumn.COUNT] > 0]
    # The 41-token prefill of slot 3 (positions 0..40) needs KV blocks [0, 1) for every tile.
    slot3 = real[(real[:, WorkColumn.TOKEN] >= 20) & (real[:, WorkColumn.TOKEN] < 61)]
    assert slot3[:, WorkColumn.COUNT].sum() == 41 and (slot3[:, WorkColumn.KV_END] == 1).all()


@pytest.mark.parametrize("group", [*range(1, 9), 16, 24, 32, 64])
def test_default_tile_shape(group):
    plan = default_plan(
        num_tokens=64, num_slots=4, num_kv_heads=2, max_kv_len=512, group=group, page_size=16, head_dim=128
    )
    n = plan.tokens_per_tile
    if group <= 8:  # head-major rows: power-of-two stores, Q boxes on 8-row tiles
        assert n >= 8 and n & (n - 1) == 0
    else:  # token-major rows
        assert n == 64 // group
    assert group * n <= plan.rows(group) == 64  # one wgmma tile of rows per consumer


def test_unsupported_reasons():
    ok = dict(dtype=jnp.bfloat16, head_dim=128, num_q_heads=32, num_kv_heads=8, page_size=16)
    assert mosaic_unsupported_reason(**ok) is None
    assert "dtype" in mosaic_unsupported_reason(**{**ok, "dtype": jnp.float32})
    assert "head_dim" in mosaic_unsupported_reason(**{**ok, "head_dim": 96})
    assert mosaic_unsupported_reason(**{**ok, "num_q_heads": 128}) is None  # GQA 16 (GLM-4-9B)
    assert mosaic_unsupported_reason(**{**ok, "num_q_heads": 512}) is None  # GQA 64
    assert "GQA" in mosaic_unsupported_reason(**{**ok, "num_q_heads": 80})  # 10: not a multiple of 8
    assert "GQA" in mosaic_unsupported_reason(**{**ok, "num_q_heads": 96})  # 12
    assert "GQA" in mosaic_unsupported_reason(**{**ok, "num_q_heads": 576})  # 72: over 64 rows
    assert "page_size" in mosaic_unsupported_reason(**{**ok, "page_size": 8})
    assert "page_size" in mosaic_unsupported_reason(**{**ok, "page_size": 256})
