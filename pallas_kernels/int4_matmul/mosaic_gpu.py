"""The int4 matmul for Hopper, written with Mosaic GPU (`plgpu.kernel`): dequantize in the kernel,
multiply with wgmma.

One CTA per (row block, column block, K split). Per CTA, one warpgroup runs a pipelined K loop
(`plgpu.emit_pipeline`, `num_stages` deep) of TMA loads: x's [block_m, block_k] window (swizzled,
the wgmma's A operand), the packed int4 values [block_k, block_n], and the step's group row of
scales (and zeros) [1, block_n]. Each step dequantizes its values in registers (Mosaic's int4 ->
bf16 conversion, then (t - zero) * scale in bf16: exact, then one rounding, as the reference) into
one of two swizzled SMEM slots, the wgmma's B operand, and issues the wgmma into a float32
accumulator; the slot the step before wrote is free again once that step's wgmma is waited for.
Every weight byte is read from HBM once; x's window is re-read by each column block (from L2).

Decode-sized M (<= 64 rows, one row block): the K loop may be split across CTAs (`k_splits`) so
that narrow layers still fill the SMs; each split writes float32 partial sums of the rows that
exist (M rounded up to 8), summed by XLA. Prefill-sized M: 128-row blocks (64 where 128 would
leave SMs idle), no split; the other option there, dequantize to bf16 and cuBLAS, is
`xla.int4_matmul_xla` (bench/int4_matmul.py times both).

Tested on CPU (tests/kernels/test_int4_matmul.py): the Mosaic GPU simulator against the
reference, and the CUDA lowering at Llama-3.1-8B's shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.int4_matmul.common import Int4Weights, permute_input, validate_inputs

_DECODE_ROWS = 64  # up to this many rows: one 64-row block, K splits allowed
_NUM_SMS = 132  # an H100's
_TARGET_CTAS = 2 * _NUM_SMS
_MAX_SPLITS = 8
_SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one launch (part of the compiled kernel)."""

    block_m: int  # rows per block: 64 or 128 (wgmma's M)
    block_n: int  # output columns per CTA: 64, 128 or 256 (block_m * block_n <= 128 * 128)
    block_k: int  # K per pipeline step, a multiple of 64 dividing the group size
    num_stages: int  # depth of the TMA ring
    k_splits: int = 1  # CTAs sharing one output block's K loop (float32 partial sums)

    def smem_bytes(self) -> int:
        """SMEM of one CTA: the ring (x window, int4 values, scale and zero rows), the two
        dequantized slots; the output staging reuses it."""
        stage = self.block_m * self.block_k * 2 + self.block_k * self.block_n // 2 + 2 * self.block_n * 2
        pipeline = self.num_stages * stage + 2 * self.block_k * self.block_n * 2
        return max(pipeline, self.block_m * self.block_n * 4)


def mosaic_unsupported_reason(*, dtype, m: int, k: int, n: int, group_size: int) -> str | None:
    """Why the Mosaic kernel cannot run this problem (None: it can)."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return f"x is {jnp.dtype(dtype).name}, not bfloat16"
    if m < 1:
        return "no rows"
    if k % 64 or group_size % 64:
        return f"K={k} and group_size={group_size} must be multiples of 64"
    if n % 64:
        return f"N={n} is not a multiple of 64"
    return None


def default_plan(*, m: int, k: int, n: int) -> Plan:
    """The plan `int4_matmul_mosaic` uses for this static problem shape: 128-column blocks, and
    enough CTAs for every SM (K splits at decode sizes, 64-row blocks for a short prefill)."""
    block_n = 128 if n % 128 == 0 else 64
    splits = 1
    if m <= _DECODE_ROWS:
        block_m = 64
        steps = k // 64
        while (n // block_n) * splits * 2 <= _TARGET_CTAS and splits * 2 <= _MAX_SPLITS and steps % (splits * 2) == 0:
            splits *= 2
    else:
        block_m = 128 if -(-m // 128) * (n // block_n) >= _NUM_SMS else 64
    return deepest_pipeline(Plan(block_m=block_m, block_n=block_n, block_k=64, num_stages=1, k_splits=splits))


def deepest_pipeline(plan: Plan) -> Plan:
    """`plan` with as many pipeline stages (2 to 6) as fit the SMEM budget."""
    one = dataclasses.replace(plan, num_stages=1)
    per_stage = dataclasses.replace(plan, num_stages=2).smem_bytes() - one.smem_bytes()
    stages = max(2, min(6, (_SMEM_BUDGET - one.smem_bytes()) // per_stage + 1))
    return dataclasses.replace(plan, num_stages=stages)


def int4_matmul_mosaic(
    x: jax.Array,  # [M, K] bf16
    w: Int4Weights,  # [K, N]
    *,
    plan: Plan | None = None,
    interpret=None,
) -> jax.Array:  # [M, N] bf16
    """Same contract as `int4_matmul_reference` (see `mosaic_unsupported_reason`).

    `plan`: None takes `default_plan`. `interpret`: None/False compiles for the GPU; an
    `InterpretGPUParams` runs the Mosaic GPU simulator on CPU (tests).
    """
    validate_inputs(x, w)
    m, k = x.shape
    n = w.shape[1]
    reason = mosaic_unsupported_reason(dtype=x.dtype, m=m, k=k, n=n, group_size=w.group_size)
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU int4 matmul: {reason}")
    plan = plan or default_plan(m=m, k=k, n=n)
    steps = k // plan.block_k
    if plan.block_k % 64 or plan.block_n % 64 or plan.block_m not in (64, 128):
        raise ValueError(f"{plan}: block_k and block_n must be multiples of 64, block_m 64 or 128")
    if n % plan.block_n or steps % plan.k_splits or w.group_size % plan.block_k:
        raise ValueError(f"{plan} does not tile K={k}, N={n}, group_size={w.group_size}")
    if plan.block_m * plan.block_n > 128 * 128:
        raise ValueError(f"{plan}: the float32 accumulator would take more than 128 registers a thread")
    if plan.k_splits > 1 and m > plan.block_m:
        raise ValueError(f"{plan}: K splits need one row block (M={m})")
    padded_m = -(-m // plan.block_m) * plan.block_m
    stored_rows = min(padded_m, -(-m // 8) * 8)  # rows each row block writes back (TMA: multiples of 8)
    x_in = permute_input(x, w)
    x_in = x_in if padded_m == m else jnp.pad(x_in, ((0, padded_m - m), (0, 0)))
    kernel = _build_kernel(
        padded_m=padded_m, stored_rows=stored_rows, k=k, n=n, group_size=w.group_size,
        has_zeros=w.zeros is not None, plan=plan, interpret=interpret,
    )
    weights = (w.values, w.scales.astype(x.dtype)) + (() if w.zeros is None else (w.zeros.astype(x.dtype),))
    out = kernel(x_in, *weights)  # [stored_rows or padded_m, N], or [splits, stored_rows, N] f32
    if plan.k_splits > 1:
        out = out.sum(axis=0)
    return out[:m].astype(x.dtype)


# bf16 SMEM tiles whose rows hold a multiple of 64 elements: 128-byte swizzled 8 x 64 tiles.
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _build_kernel(
    *, padded_m: int, stored_rows: int, k: int, n: int, group_size: int, has_zeros: bool, plan: Plan, interpret
):
    bm, bn, bk, splits = plan.block_m, plan.block_n, plan.block_k, plan.k_splits
    grid_n = n // bn
    grid_m = padded_m // bm
    steps_per_split = k // bk // splits
    steps_per_group = group_size // bk
    tile_rows = min(bm, stored_rows)  # rows of a row block that go back to GMEM
    dtype = jnp.bfloat16
    out_dtype = jnp.float32 if splits > 1 else dtype

    def dequantize_into(out_smem, values_smem, scales_smem, zeros_smem) -> None:
        """int4 [bk, bn] -> (t - zero) * scale, bf16 [bk, bn]."""
        w = values_smem[...].astype(dtype)  # [bk, bn]: exact
        if zeros_smem is not None:
            w = w - lax.broadcast_in_dim(zeros_smem[0], w.shape, [1])  # exact: |t - zero| <= 16
        out_smem[...] = w * lax.broadcast_in_dim(scales_smem[0], w.shape, [1])

    def matmul(x_block, weight_refs, col, first_step):
        """float32 [bm, bn]: x_block [bm, K] times this CTA's share of the K loop."""

        def x_index(kk):
            return 0, first_step + kk

        def value_index(kk):
            return first_step + kk, col

        def group_index(kk):
            return lax.div(first_step + kk, steps_per_group), col

        specs = [
            plgpu.BlockSpec((bm, bk), x_index, transforms=_SWIZZLED, delay_release=1),
            plgpu.BlockSpec((bk, bn), value_index),
            plgpu.BlockSpec((1, bn), group_index),
        ]
        if has_zeros:
            specs.append(plgpu.BlockSpec((1, bn), group_index))

        def scope(dequantized, acc):
            def step(indices, x_smem, values_smem, scales_smem, *zeros_smem):
                # Two slots: this step writes one while the step before's wgmma may still read the other.
                slot = dequantized.at[lax.rem(indices[0], 2)]
                dequantize_into(slot, values_smem, scales_smem, zeros_smem[0] if zeros_smem else None)
                plgpu.commit_smem()
                plgpu.wgmma(acc, x_smem, slot)
                # The step before's wgmma is done: its x slot may be refilled (delay_release=1) and
                # its dequantized slot rewritten next step.
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(step, grid=(steps_per_split,), in_specs=specs, max_concurrent_steps=plan.num_stages)(
                x_block, *weight_refs
            )
            return acc[...]

        # NOTE: the accumulator gets a run_scoped of its own: the simulator refuses register
        # allocations mixed with SMEM ones.
        return pl.run_scoped(
            lambda dequantized: pl.run_scoped(lambda acc: scope(dequantized, acc), plgpu.ACC((bm, bn), jnp.float32)),
            plgpu.SMEM((2, bk, bn), dtype, transforms=_SWIZZLED),
        )

    def int4_matmul_kernel(x_ref, *refs):  # its name is the CUDA kernel's
        weight_refs, out_ref = refs[:-1], refs[-1]
        item = lax.axis_index("item")
        split = lax.rem(item, splits)
        block = lax.div(item, splits)
        row_block, col = lax.div(block, grid_n), lax.rem(block, grid_n)
        x_block = x_ref.at[pl.ds(pl.multiple_of(row_block * bm, bm), bm)]  # [bm, K]
        acc = matmul(x_block, weight_refs, col, split * steps_per_split)

        def store(o_smem):
            o_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            rows = pl.ds(pl.multiple_of(row_block * bm, 8), tile_rows)
            target = out_ref.at[split] if splits > 1 else out_ref
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, tile_rows)], target.at[rows, pl.ds(col * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        # Untiled, so that any multiple of 8 rows can be stored.
        pl.run_scoped(store, plgpu.SMEM((bm, bn), out_dtype))

    out_rows = stored_rows if grid_m == 1 else padded_m
    out_shape = (splits, out_rows, n) if splits > 1 else (out_rows, n)
    return plgpu.kernel(
        int4_matmul_kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(grid_m * grid_n * splits,),
        grid_names=("item",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
