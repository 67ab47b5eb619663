"""MLA attention in the absorbed form (common.py) for Hopper, written with Mosaic GPU.

All heads share one latent stream, so a CTA reads each latent block once for all its heads: the
wgmma rows are a tile's tokens x heads, token-major (row r = t * Hg + h), 64 rows per CTA. A head
group Hg is every head up to 64 (n = 64 // Hg tokens per tile: a decode, or a short chunk, per
tile), or 64 of them (n = 1) for 128 heads, where each group reads the latents once.

One CTA per item (a work row of ragged paged attention's `work_list`, x a head group), with two
consumer warpgroups and a producer:
  - producer: loads the tile's queries (q_latent split in two halves, q_pe), then walks the
    item's latent blocks, one TMA copy per page (or page part) and part (c_kv's two halves,
    k_pe) into a `num_slots`-deep SMEM ring;
  - consumer c: S = q_latent c_kv^T + q_pe k_pe^T (three wgmmas over the whole slot: both
    consumers compute the same S), online softmax in fp32 (exp2 domain), O_c += P c_kv[:, half c]
    (O's columns split in two: 64 x 256 fp32 is half the registers a warpgroup has). At the end
    each writes its half of out [T, H, R] through its query half's SMEM (free once both are done).

Split-K (few long requests: too few items to fill the SMs): each tile's KV range is cut into
several work rows that write normalised partials and their log-sum-exp, merged in jnp.
Every request length is served (a prefill chunk is cut into n-token tiles, each re-reading its
context: correct, but the XLA path or the expanded form is the one to use for prefill).
`mla_unsupported_reason` says which shapes fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_attention.common import validate_absorbed
from pallas_kernels.ragged_paged_attention.mosaic_gpu import WorkColumn, add_pv, work_list

_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite "minus infinity" (see ragged_paged_attention/mosaic_gpu.py)
_ROWS = 64  # wgmma rows per CTA
_LSE_WIDTH = 32  # fp32: 128-byte rows, the SMEM alignment of a TMA box
_HEAD_GROUPS = (8, 16, 32, 64)  # heads per CTA whose tokens fill the 64 rows exactly


def mla_unsupported_reason(*, dtype, num_heads: int, kv_lora_rank: int, rope_dim: int, page_size: int) -> str | None:
    """Why the Mosaic kernel cannot serve this absorbed MLA shape (None: it can).

    Accepted: bf16/fp16; 8, 16, 32 or 64 heads, or a multiple of 64; kv_lora_rank 128, 256, 384
    or 512 and qk_rope_head_dim 64..256 (a multiple of 64), R + Dr <= 576; pages of a power of two
    >= 8 tokens; any q_len per request (tiles of 64 // heads tokens, see the module docstring)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} is not bf16/fp16"
    if num_heads not in _HEAD_GROUPS and num_heads % _ROWS:
        return f"{num_heads} heads is not 8, 16, 32, 64 or a multiple of 64"
    if kv_lora_rank % 128 or kv_lora_rank > 512:
        return f"kv_lora_rank {kv_lora_rank} is not a multiple of 128 up to 512"  # two halves of 64..256
    if rope_dim % 64 or rope_dim > 256:
        return f"qk_rope_head_dim {rope_dim} is not a multiple of 64 up to 256"
    if kv_lora_rank + rope_dim > 576:
        # The queries (64 rows) and two 64-row latent slots, all R + Dr wide, fill the 227 KiB of SMEM.
        return f"kv_lora_rank + qk_rope_head_dim = {kv_lora_rank + rope_dim} is over 576 (SMEM)"
    if page_size < 8 or page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two >= 8"
    return None


@dataclasses.dataclass(frozen=True)
class MlaPlan:
    """The static shape of one launch (part of the compiled kernel)."""

    block_kv: int = 64  # latent rows per pipeline step (the P V wgmma's depth: a multiple of 64)
    num_slots: int = 2  # depth of the latent ring: 2 x 64 x 576 x 2 bytes = 144 KiB at DeepSeek's shapes
    kv_splits: int = 1  # > 1: split-K, merged in jnp


@functools.cache
def _num_sms() -> int:
    """The first GPU's SM count; 132 (H100/H200 SXM) where there is none (CUDA lowering on CPU)."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except Exception:  # noqa: BLE001 - no GPU backend here, or no core_count
        return 132


def default_mla_plan(*, num_items: int, max_kv_len: int) -> MlaPlan:
    """Split-K when the items (tiles x head groups) cannot fill the SMs and the contexts are long:
    as many splits as keep every split's CTA in one wave (items x splits <= SMs), each split at
    least 4 blocks."""
    plan = MlaPlan()
    splits = min(32, _num_sms() // max(num_items, 1), max_kv_len // (4 * plan.block_kv))
    return dataclasses.replace(plan, kv_splits=splits) if splits > 1 else plan


def _swizzled(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    minor_bytes = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = min(128, minor_bytes)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def _build_kernel(*, num_tokens, num_heads, rank, rope_dim, page_size, num_pages, pages_per_seq, num_items, dtype,
                  plan: MlaPlan, sm_scale: float, simulate: bool, interpret):
    """The kernel: (work [W, WORK_COLUMNS], page_indices [S, P], q [T, H, R + Dr], latent_pages) ->
    out [T, H, R], or with split-K (partials [K, T, H, R], log2-sum-exp2 [K, T, H, _LSE_WIDTH])."""
    heads = min(num_heads, _ROWS)  # Hg
    head_groups = num_heads // heads
    n = _ROWS // heads  # tokens per tile
    half = rank // 2
    bkv = plan.block_kv
    slots = plan.num_slots
    splits = plan.kv_splits
    rows_per_copy = min(page_size, bkv)  # latent rows per TMA copy: a page, or a part of one
    copies = bkv // rows_per_copy
    parts = ((0, half), (half, half), (rank, rope_dim))  # (first column, width): c_kv halves, k_pe

    def view(work_ref, w):
        return {c: work_ref[w, c] for c in WorkColumn}

    def consumer(c, work_ref, q_smem, ring, kt_smem, p_smem, lse_smem, bars, out_refs, head0, w):
        q_bar, k_bar, k_free, q_free = bars
        plgpu.set_max_registers(232, action="increase")
        v = view(work_ref, w)

        @pl.when(v[WorkColumn.COUNT] > 0)
        def _attend():
            shift = v[WorkColumn.TOKEN] - v[WorkColumn.LOAD_FROM]
            pos_first = v[WorkColumn.POS] - shift
            kv_start, kv_end = v[WorkColumn.KV_START], v[WorkColumn.KV_END]
            plgpu.barrier_wait(q_bar)

            def step(kv_block, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(kv_block - kv_start, slots)
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    for q_part, k_part, kt in zip(q_smem, ring, kt_smem, strict=True):
                        plgpu.wgmma(acc_ref, q_part, _transposed(k_part.at[slot], None if kt is None else kt.at[c]))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((_ROWS, bkv), jnp.float32))
                s = s * (sm_scale * _LOG2E)
                if masked:
                    row = lax.broadcasted_iota(jnp.int32, (_ROWS, bkv), 0)
                    col = lax.broadcasted_iota(jnp.int32, (_ROWS, bkv), 1)
                    s = jnp.where(kv_block * bkv + col <= pos_first + lax.div(row, heads), s, _MASKED)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                acc = add_pv(acc, p.astype(dtype), ring[c].at[slot], None if p_smem is None else p_smem.at[c])
                plgpu.barrier_arrive(k_free.at[slot])
                return acc, m_new, l_i

            carry = (
                jnp.zeros((_ROWS, half), jnp.float32),
                jnp.full((_ROWS,), _MASKED, jnp.float32),
                jnp.zeros((_ROWS,), jnp.float32),
            )
            mask_from = v[WorkColumn.MASK_FROM]
            carry = lax.fori_loop(kv_start, mask_from, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(mask_from, kv_end, functools.partial(step, masked=True), carry)
            seen = m_i > 0.5 * _MASKED
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
            o = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            # Both consumers are done reading the queries: each stages its half of O in its half's buffer.
            plgpu.barrier_arrive(q_free)
            plgpu.barrier_wait(q_free)
            o_smem = q_smem[c]
            o_smem[...] = o
            stores = [(o_smem, out_refs[0], pl.ds(c * half, half))]
            if splits > 1 and c == 0:
                lse = jnp.where(seen, m_i + jnp.log2(jnp.where(seen, l_i, 1.0)), _MASKED)
                lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
                stores.append((lse_smem, out_refs[1], pl.ds(0, _LSE_WIDTH)))
            plgpu.commit_smem()
            split = v[WorkColumn.SPLIT]

            @pl.loop(0, v[WorkColumn.COUNT])
            def _store_token(t):
                for smem, gmem, columns in stores:
                    target = gmem.at[split] if splits > 1 else gmem
                    plgpu.copy_smem_to_gmem(
                        smem.at[pl.ds(pl.multiple_of((shift + t) * heads, 8), heads)],
                        target.at[v[WorkColumn.TOKEN] + t, pl.ds(head0, heads), columns],
                    )

            plgpu.wait_smem_to_gmem(0)

    def producer(work_ref, page_indices_ref, q_ref, pages_ref, q_smem, ring, bars, head0, w):
        q_bar, k_bar, k_free, _ = bars
        plgpu.set_max_registers(40, action="decrease")
        v = view(work_ref, w)

        @pl.when(v[WorkColumn.COUNT] > 0)
        def _produce():
            @pl.loop(0, n)
            def _load_token(t):
                for q_part, (first, width) in zip(q_smem, parts, strict=True):
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[v[WorkColumn.LOAD_FROM] + t, pl.ds(head0, heads), pl.ds(first, width)],
                        q_part.at[pl.ds(pl.multiple_of(t * heads, 8), heads)],
                        q_bar,
                    )

            kv_start, kv_end = v[WorkColumn.KV_START], v[WorkColumn.KV_END]
            seq = v[WorkColumn.SEQ]

            @pl.loop(0, kv_end - kv_start)
            def _fetch(b):
                slot = lax.rem(b, slots)
                pl.when(b >= slots)(lambda: plgpu.barrier_wait(k_free.at[slot]))

                @pl.loop(0, copies)
                def _fetch_rows(j):
                    token = (kv_start + b) * bkv + j * rows_per_copy  # position of the copy's first row
                    entry = jnp.minimum(lax.div(token, page_size), pages_per_seq - 1)
                    page = jnp.clip(page_indices_ref[seq, entry], 0, num_pages - 1)
                    within = pl.multiple_of(lax.rem(token, page_size), rows_per_copy)
                    dst_rows = pl.ds(pl.multiple_of(j * rows_per_copy, rows_per_copy), rows_per_copy)
                    for part, (first, width) in zip(ring, parts, strict=True):
                        plgpu.copy_gmem_to_smem(
                            pages_ref.at[page, pl.ds(within, rows_per_copy), pl.ds(first, width)],
                            part.at[slot, dst_rows],
                            k_bar.at[slot],
                        )

            # Observe the consumers' releases of the last slots, so every barrier phase has a waiter.
            total = kv_end - kv_start

            @pl.loop(jnp.maximum(total - slots, 0), total)
            def _drain(b):
                plgpu.barrier_wait(k_free.at[lax.rem(b, slots)])

    def body(work_ref, page_indices_ref, q_ref, pages_ref, *refs):
        out_refs = refs[: len(out_type)]
        q_smem, ring, kt_smem, p_smem, lse_smem, bars = refs[len(out_type) :]
        item = lax.axis_index("cta")
        w, head0 = lax.div(item, head_groups), lax.rem(item, head_groups) * heads
        wg = lax.axis_index("wg")
        for c in range(2):
            pl.when(wg == c)(functools.partial(consumer, c, work_ref, q_smem, ring, kt_smem, p_smem, lse_smem, bars,
                                               out_refs, head0, w))
        pl.when(wg == 2)(lambda: producer(work_ref, page_indices_ref, q_ref, pages_ref, q_smem, ring, bars, head0, w))

    if splits > 1:
        out_type = [
            jax.ShapeDtypeStruct((splits, num_tokens, num_heads, rank), dtype),
            jax.ShapeDtypeStruct((splits, num_tokens, num_heads, _LSE_WIDTH), jnp.float32),
        ]
    else:
        out_type = [jax.ShapeDtypeStruct((num_tokens, num_heads, rank), dtype)]
    widths = [width for _, width in parts]
    scratch = [
        tuple(_swizzled((_ROWS, width), dtype) for width in widths),  # queries; then each consumer's O half
        tuple(_swizzled((slots, bkv, width), dtype) for width in widths),  # the latent ring, by part
        # The simulator reads neither a transposed wgmma operand nor P from registers: staged copies.
        tuple(plgpu.SMEM((2, width, bkv), dtype) for width in widths) if simulate else (None, None, None),
        _swizzled((2, _ROWS, bkv), dtype) if simulate else None,
        plgpu.SMEM((_ROWS, _LSE_WIDTH), jnp.float32) if splits > 1 else None,
        (
            plgpu.Barrier(num_arrivals=3 * n),  # the queries: three parts per token
            plgpu.Barrier(num_arrivals=3 * copies, num_barriers=slots),  # a latent block arrived
            plgpu.Barrier(num_arrivals=2, num_barriers=slots),  # both consumers released a slot
            plgpu.Barrier(num_arrivals=2),  # both consumers are done with the queries
        ),
    ]
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_items,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True),
        interpret=interpret,
    )


def _transposed(k_slot, kt_scratch):
    """The B operand of S = Q K^T: a transposed view on the GPU; a transposed copy in the simulator
    (jax 0.10.2's cannot interpret a transposed wgmma operand)."""
    if kt_scratch is None:
        return k_slot.transpose((1, 0))
    kt_scratch[...] = k_slot[...].T
    return kt_scratch


def mla_absorbed_mosaic(
    q_latent: jax.Array,  # [T, H, R]
    q_pe: jax.Array,  # [T, H, Dr]
    latent_pages: jax.Array,  # [num_pages, page_size, R + Dr]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    *,
    sm_scale: float,
    plan: MlaPlan | None = None,
    interpret=None,
) -> jax.Array:  # [T, H, R]
    """The absorbed form on Hopper; same contract as `mla_absorbed_reference`.

    `plan`: None takes `default_mla_plan` for these shapes. `interpret`: None/False compiles for
    the GPU; an `InterpretGPUParams` runs the Mosaic GPU simulator on CPU (tests)."""
    validate_absorbed(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, rank = q_latent.shape
    rope_dim = q_pe.shape[2]
    num_pages, page_size, _ = latent_pages.shape
    reason = mla_unsupported_reason(dtype=q_latent.dtype, num_heads=num_heads, kv_lora_rank=rank, rope_dim=rope_dim,
                                    page_size=page_size)
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU MLA attention: {reason}")
    heads = min(num_heads, _ROWS)
    head_groups = num_heads // heads
    n = _ROWS // heads
    num_slots, pages_per_seq = page_indices.shape
    if plan is None:
        decode_like = num_tokens <= 2 * num_slots
        plan = default_mla_plan(num_items=num_slots * head_groups if decode_like else _num_sms(),
                                max_kv_len=pages_per_seq * page_size)
    if plan.block_kv % 64 or plan.block_kv & (plan.block_kv - 1):
        raise ValueError(f"block_kv must be a power of two >= 64 (the P V wgmma's depth), got {plan}")
    padded_tokens = max(-(-num_tokens // 8) * 8, n)
    q = jnp.concatenate([q_latent, q_pe], axis=-1)  # [T, H, R + Dr]
    q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    work = work_list(cu_q_lens, kv_lens, num_seqs, num_tokens=padded_tokens, tokens_per_tile=n,
                     block_kv=plan.block_kv, sliding_window=None, kv_splits=plan.kv_splits)
    kernel = _build_kernel(
        num_tokens=padded_tokens, num_heads=num_heads, rank=rank, rope_dim=rope_dim, page_size=page_size,
        num_pages=num_pages, pages_per_seq=pages_per_seq, num_items=work.shape[0] * head_groups,
        dtype=q_latent.dtype, plan=plan, sm_scale=sm_scale, simulate=interpret is not None and interpret is not False,
        interpret=interpret,
    )
    outs = kernel(work, page_indices, q, latent_pages)
    if plan.kv_splits == 1:
        return outs[0][:num_tokens]
    return _merge_splits(*outs)[:num_tokens].astype(q_latent.dtype)


def _merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """o_parts [K, T, H, R] (each split normalised), lse_parts [K, T, H, _LSE_WIDTH] (log2 domain)
    -> [T, H, R] f32. A split that saw no key (lse = _MASKED, o = 0) weighs nothing next to one that
    did; a token no split served (padding) comes out 0."""
    lse = lse_parts[..., 0]  # [K, T, H]
    weight = jnp.exp2(lse - lse.max(axis=0))  # [K, T, H]
    # NOTE: a product and a sum, not einsum: a GPU f32 dot may round through TF32.
    merged = (weight[..., None] * o_parts.astype(jnp.float32)).sum(axis=0)
    return merged / weight.sum(axis=0)[..., None]
