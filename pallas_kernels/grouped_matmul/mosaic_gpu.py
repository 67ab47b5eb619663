"""Grouped matmul for Hopper, written with Mosaic GPU (`plgpu.kernel`).

The unit of work is an *item*: one row tile (<= block_m consecutive rows of one group, from
`common.row_tiles`) times one block of block_n output columns. One CTA per item, in row-tile-major
order, so the CTAs running at once share their group's weights and their row tile's lhs in L2.
Empty groups have no row tile, so an untouched expert's weights are never read; CTAs past the
real items exit at once. The rows past sum(group_sizes) get tiles of zeros.

Per CTA, one warpgroup:
  - a pipelined K loop (`plgpu.emit_pipeline`, `num_stages` deep): TMA loads of the lhs window
    [block_m, block_k] and the group's weight block(s) [block_k, block_n] into swizzled SMEM,
    one wgmma per weight block into fp32 accumulators. With an activation (split layout) a CTA
    reads the gate block and the matching up block (columns N/2 further), so its block_n output
    columns need both halves in its own registers;
  - the epilogue in registers: + bias (its row loaded by TMA while the K loop runs), the
    activation, the cast; then the tile's rows go to GMEM with power-of-two TMA stores (a tile
    may start and end on any row).

MXFP4 weights (`mxfp4.Mxfp4Weights`, gpt-oss): the pipeline loads a chunk's code bytes [64, block_n]
and two scale rows instead of a weight block, and each K step dequantizes them in registers (a
shift-and-mask table of e2m1 magnitudes, the row's scale, the sign) into one of two swizzled SMEM
slots, the wgmma's operand; the other slot is still being read by the step before's wgmma. Only
the packed bytes come from HBM (~0.53 byte a weight instead of 2), at the price of ~15 integer
and float operations a weight on the CUDA cores.

Plans (`default_plan`): decode-sized groups (memory-bound: every touched expert's weights are
streamed once) get 64-row tiles and 64-column blocks, so even 8 rows spread over 8 experts make
~100+ CTAs; prefill-sized groups get 128 x 128 tiles. Both keep SMEM under half of the 227 KiB,
so two CTAs share an SM and one's epilogue overlaps the other's loads.

Tested on CPU (tests/kernels/test_grouped_matmul.py, test_grouped_matmul_mxfp4.py): the Mosaic
GPU simulator against the reference, and the CUDA lowering of the decode and prefill plans.
bench/grouped_matmul.py times it (`--mxfp4`: bf16 against packed weights).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import mxfp4
from pallas_kernels.grouped_matmul.common import (
    Activation,
    Rhs,
    TileColumn,
    max_row_tiles,
    output_columns,
    padded_rows,
    row_tiles,
    validate_inputs,
)

_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_ALIGN = 64  # K and the output columns: multiples of one 64-element block (128-byte SMEM rows)
_DECODE_ROWS_PER_GROUP = 64  # up to this many rows per group on average: a decode plan
_SMEM_PER_CTA = 112 * 1024  # two CTAs per SM


def mosaic_unsupported_reason(
    *, dtype, m: int, k: int, n: int, num_groups: int, activation: Activation | None
) -> str | None:
    """Why the Mosaic GPU kernel cannot run this problem (None: it can). n: rhs columns."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not bf16/fp16"
    if m < 1 or num_groups < 1:
        return f"no rows ({m}) or no groups ({num_groups})"
    if k % _ALIGN:
        return f"K={k} is not a multiple of {_ALIGN}"
    if activation is not None and activation.layout != "split":
        return (
            "interleaved gate/up columns: permute rhs and bias to the split layout once, at load "
            "time (`interleaved_to_split`), and use layout='split'"
        )
    n_out = output_columns(n, activation)
    if activation is not None and n % 2:
        return f"N={n} is odd: no gate/up halves"
    if n_out % _ALIGN:
        return f"{n_out} output columns are not a multiple of {_ALIGN}"
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one launch (part of the compiled kernel)."""

    block_m: int  # rows per tile: 64 or 128 (wgmma's M)
    block_n: int  # output columns per CTA (each half, with an activation): 64 or 128
    block_k: int  # K per pipeline step
    num_stages: int  # depth of the TMA ring

    def stage_bytes(self, itemsize: int, num_weight_blocks: int, packed: bool = False) -> int:
        """SMEM of one slot of the pipeline's ring: an lhs block and the weight blocks (packed MXFP4:
        a chunk's block_k code bytes, of which the step uses one nibble, and block_k / 32 scale
        bytes per output column)."""
        per_column = self.block_k + self.block_k // mxfp4.BLOCK if packed else self.block_k * itemsize
        return self.block_m * self.block_k * itemsize + num_weight_blocks * self.block_n * per_column

    def dequantized_bytes(self, itemsize: int, num_weight_blocks: int, packed: bool) -> int:
        """MXFP4 only: two slots of dequantized weight blocks, the wgmma's operand."""
        return num_weight_blocks * 2 * self.block_k * self.block_n * itemsize if packed else 0

    def smem_bytes(self, itemsize: int, num_weight_blocks: int, packed: bool = False) -> int:
        """SMEM of one CTA; the output tile reuses the pipeline's."""
        pipeline = self.num_stages * self.stage_bytes(itemsize, num_weight_blocks, packed)
        pipeline += self.dequantized_bytes(itemsize, num_weight_blocks, packed)
        return max(pipeline, self.block_m * self.block_n * itemsize)


def default_plan(
    *, m: int, k: int, n: int, num_groups: int, activation: Activation | None, packed: bool = False
) -> Plan:
    """The plan `grouped_matmul_mosaic` uses for this static problem shape (n: rhs columns;
    packed: MXFP4 weights)."""
    n_out = output_columns(n, activation)
    weight_blocks = 1 if activation is None else 2
    if m <= _DECODE_ROWS_PER_GROUP * num_groups:
        block_m, block_n = 64, 64
    elif activation is None and n_out % 128 == 0:
        block_m, block_n = 128, 128
    else:
        # With an activation a CTA holds two accumulators (gate and up): 128 x 64 each.
        block_m, block_n = 128, 64
    block_k = 64  # also MXFP4's K step (`mxfp4.KERNEL_STEP`)
    plan = Plan(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=1)
    ring = _SMEM_PER_CTA - plan.dequantized_bytes(2, weight_blocks, packed)
    stages = max(2, min(6, ring // plan.stage_bytes(2, weight_blocks, packed)))
    return dataclasses.replace(plan, num_stages=stages)


def grouped_matmul_mosaic(
    lhs: jax.Array,  # [M, K]
    rhs: Rhs,  # [E, K, N], dense (lhs's dtype) or MXFP4
    group_sizes: jax.Array,  # [E] i32
    *,
    bias: jax.Array | None = None,  # [E, N]
    activation: Activation | None = None,
    plan: Plan | None = None,
    interpret=None,
) -> jax.Array:  # [M, N] or [M, N / 2]
    """Same contract as `grouped_matmul_reference`; padding rows come out zero. bf16/fp16 only
    (see `mosaic_unsupported_reason`); a bias is used in lhs's dtype. MXFP4 weights are
    dequantized to lhs's dtype in the kernel, block by block, and need plan.block_k == 64.

    `plan`: None takes `default_plan`. `interpret`: None/False compiles for the GPU; an
    `InterpretGPUParams` runs the Mosaic GPU simulator on CPU (tests).
    """
    validate_inputs(lhs, rhs, group_sizes, bias, activation)
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    reason = mosaic_unsupported_reason(
        dtype=lhs.dtype, m=m, k=k, n=n, num_groups=num_groups, activation=activation
    )
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU grouped matmul: {reason}")
    packed = isinstance(rhs, mxfp4.Mxfp4Weights)
    if not packed and rhs.dtype != lhs.dtype:
        raise ValueError(f"lhs ({lhs.dtype}) and rhs ({rhs.dtype}) must share a dtype")
    if bias is not None:
        bias = bias.astype(lhs.dtype)  # [E, N]; the epilogue adds it in fp32
    plan = plan or default_plan(m=m, k=k, n=n, num_groups=num_groups, activation=activation, packed=packed)
    n_out = output_columns(n, activation)
    if k % plan.block_k or n_out % plan.block_n:
        raise ValueError(f"{plan} does not tile K={k} and {n_out} output columns")
    if packed and plan.block_k != mxfp4.KERNEL_STEP:
        raise ValueError(f"MXFP4 weights need block_k {mxfp4.KERNEL_STEP} (half their packed chunk), got {plan}")
    padded_m = padded_rows(m, plan.block_m)  # every tile's window lies inside the rows
    lhs_in = lhs if padded_m == m else jnp.pad(lhs, ((0, padded_m - m), (0, 0)))
    tiles, _ = row_tiles(group_sizes, m=m, block_m=plan.block_m, with_padding=True)
    kernel = _build_kernel(
        padded_m=padded_m,
        k=k,
        n=n,
        num_groups=num_groups,
        num_tiles=max_row_tiles(m, num_groups, plan.block_m),
        dtype=lhs.dtype,
        has_bias=bias is not None,
        packed=packed,
        activation=activation,
        plan=plan,
        interpret=interpret,
    )
    weights = (rhs.blocks, rhs.scales) if packed else (rhs,)
    args = (tiles, lhs_in, *weights) + ((bias,) if bias is not None else ())
    out = kernel(*args)  # [padded_m, n_out]
    return out if padded_m == m else out[:m]


# The doubled magnitudes of e2m1 codes 0..7 (0, 1, 2, 3, 4, 6, 8, 12), 4 bits each: code c's is
# (_DOUBLED_MAGNITUDES >> 4c) & 15. A shift and a mask, where a table gather has no register form.
_DOUBLED_MAGNITUDES = 0xC8643210 - (1 << 32)  # as an int32
# 2^23 as float32 bits: OR-ing an integer 0 <= i < 2^23 into them gives the float 2^23 + i, so
# i = that - 2^23 exactly, on the integer and float units instead of the slower conversion unit.
_TWO_POW_23_BITS = 0x4B000000


def _dequantize_into(out_smem, blocks_smem, scales_smem, step) -> None:
    """K step `step` of MXFP4 weights into the wgmma's operand: blocks [64, bn] u8 (the step's
    chunk: even steps take the low nibbles, odd ones the high) and scales [2, bn] u8 (rows 0-31
    and 32-63 of the step) -> out_smem [64, bn] in its dtype."""
    bytes_ = blocks_smem[...].astype(jnp.int32)  # [64, bn]
    shape = bytes_.shape
    shift = lax.broadcast(lax.rem(step, 2) * 4, shape)
    codes = lax.shift_right_logical(bytes_, shift) & 0xF  # [64, bn]
    magnitude = (jnp.int32(_DOUBLED_MAGNITUDES) >> ((codes & 7) << 2)) & 0xF  # [64, bn]
    # Halved scales, as the magnitudes are doubled; rows 0-31 take the first, rows 32-63 the second.
    first, second = (lax.broadcast_in_dim(mxfp4.scale_values(scales_smem[j]) * 0.5, shape, [1]) for j in range(2))
    row = lax.broadcasted_iota(jnp.int32, shape, 0)
    magnitude = lax.bitcast_convert_type(magnitude | _TWO_POW_23_BITS, jnp.float32) - float(1 << 23)
    value = magnitude * jnp.where(row < mxfp4.BLOCK, first, second)
    out_smem[...] = jnp.where(codes >= 8, -value, value).astype(out_smem.dtype)


def _swizzled_transforms(minor: int, dtype) -> tuple:
    swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _build_kernel(
    *,
    padded_m: int,
    k: int,
    n: int,
    num_groups: int,
    num_tiles: int,
    dtype,
    has_bias: bool,
    packed: bool,
    activation: Activation | None,
    plan: Plan,
    interpret,
):
    bm, bn, bk = plan.block_m, plan.block_n, plan.block_k
    n_out = output_columns(n, activation)
    grid_n = n_out // bn
    # Column-block indices (in units of bn) of the weight blocks one CTA multiplies: the output
    # block itself, or its gate block and the up block N/2 further.
    half_blocks = [0] if activation is None else [0, (n // 2) // bn]
    lhs_transforms = _swizzled_transforms(bk, dtype)
    rhs_transforms = _swizzled_transforms(bn, dtype)

    def matmul(lhs_window, rhs_group, col_block):
        """fp32 [bm, bn] accumulators, one per weight block, of lhs_window @ rhs_group blocks.
        rhs_group: the group's [K, N] ref, or its MXFP4 (blocks [Kp/2, N], scales [K/32, N]) refs."""
        specs = [plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=lhs_transforms, delay_release=1)]
        for offset in half_blocks:
            def columns(kk, offset=offset):
                return kk, col_block + offset

            if packed:
                def chunk_columns(kk, offset=offset):
                    return lax.div(kk, 2), col_block + offset

                # No delay_release: the step reads them into registers before commit_smem's barrier.
                specs += [
                    plgpu.BlockSpec((mxfp4.KERNEL_STEP, bn), chunk_columns),  # a 128-chunk's 64 byte rows
                    plgpu.BlockSpec((bk // mxfp4.BLOCK, bn), columns),
                ]
            else:
                specs.append(plgpu.BlockSpec((bk, bn), columns, transforms=rhs_transforms, delay_release=1))
        weight_refs = list(rhs_group) if packed else [rhs_group]

        def scope(dequantized, *accs):
            def step(indices, lhs_smem, *weight_smems):
                if packed:
                    # Two slots per weight block: this step writes one while the step before's
                    # wgmmas may still read the other.
                    slot = lax.rem(indices[0], 2)
                    rhs_smems = [dequantized.at[j, slot] for j in range(len(half_blocks))]
                    for j, rhs_smem in enumerate(rhs_smems):
                        _dequantize_into(rhs_smem, *weight_smems[2 * j : 2 * j + 2], indices[0])
                    plgpu.commit_smem()
                else:
                    rhs_smems = weight_smems
                for acc, rhs_smem in zip(accs, rhs_smems, strict=True):
                    plgpu.wgmma(acc, lhs_smem, rhs_smem)
                # The step before's wgmmas are done (this step's may run on): the pipeline refills
                # their lhs (and dense weight) slots next (delay_release=1), and a packed step
                # rewrites their dequantized slot.
                plgpu.wgmma_wait(len(accs))

            plgpu.emit_pipeline(step, grid=(k // bk,), in_specs=specs, max_concurrent_steps=plan.num_stages)(
                lhs_window, *(weight_refs * len(half_blocks))
            )
            return tuple(acc[...] for acc in accs)

        def with_accumulators(dequantized):
            # NOTE: accumulators get a run_scoped of their own: the simulator refuses register
            # allocations mixed with SMEM ones.
            accs = [plgpu.ACC((bm, bn), jnp.float32) for _ in half_blocks]
            return pl.run_scoped(lambda *refs: scope(dequantized, *refs), *accs)

        if not packed:
            return with_accumulators(None)
        dequantized = plgpu.SMEM((len(half_blocks), 2, bk, bn), dtype, transforms=rhs_transforms)
        return pl.run_scoped(with_accumulators, dequantized)

    def epilogue(accs, bias_smem):
        """[bm, bn] fp32 per weight block -> [bm, bn] output values."""
        if bias_smem is not None:
            accs = [
                acc + lax.broadcast_in_dim(bias_smem[j].astype(jnp.float32), acc.shape, [1])
                for j, acc in enumerate(accs)
            ]
        y = accs[0] if activation is None else activation.combine(*accs)
        return y.astype(dtype)

    def store(out_ref, values, row, shift, count, col_block):
        """Rows [shift, shift + count) of the tile's values to out rows [row, row + count)."""

        def scope(o_smem):
            o_smem[...] = values
            plgpu.commit_smem()
            done = jnp.int32(0)
            size = bm
            while size:
                # TMA boxes have static sizes: store `count` rows as a sum of powers of two.
                @pl.when((count & size) != 0)
                def _store_rows(done=done, size=size):
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[pl.ds(shift + done, size)],
                        out_ref.at[pl.ds(row + done, size), pl.ds(col_block * bn, bn)],
                    )

                done = done + (count & size)
                size //= 2
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        # Untiled, so that any row can start a TMA store (128-byte rows: bn * 2 bytes >= 128).
        pl.run_scoped(scope, plgpu.SMEM((bm, bn), dtype))

    def grouped_matmul_kernel(tiles_ref, lhs_ref, *refs):  # its name is the CUDA kernel's
        weight_refs, refs = (refs[:2], refs[2:]) if packed else (refs[:1], refs[1:])
        bias_ref = refs[0] if has_bias else None
        out_ref = refs[-1]
        item = lax.axis_index("item")
        tile, col_block = lax.div(item, grid_n), lax.rem(item, grid_n)
        group, load_from, row, count = (
            tiles_ref[tile, c] for c in (TileColumn.GROUP, TileColumn.LOAD_FROM, TileColumn.ROW, TileColumn.COUNT)
        )
        shift = row - load_from

        @pl.when((count > 0) & (group < num_groups))
        def _group_tile():
            # NOTE: a multiple of 8 rows: Mosaic's layout inference rejects other dynamic starts.
            lhs_window = lhs_ref.at[pl.ds(pl.multiple_of(load_from, 8), bm)]  # [bm, K]
            # [K, N], or blocks [K/2, N] and scales [K/32, N]
            rhs_group = tuple(ref.at[group] for ref in weight_refs) if packed else weight_refs[0].at[group]
            if bias_ref is None:
                values = epilogue(matmul(lhs_window, rhs_group, col_block), None)
                store(out_ref, values, row, shift, count, col_block)
                return

            def with_bias(bias_smem, bias_bar):
                for j, offset in enumerate(half_blocks):
                    plgpu.copy_gmem_to_smem(
                        bias_ref.at[group, pl.ds((col_block + offset) * bn, bn)], bias_smem.at[j], bias_bar
                    )
                accs = matmul(lhs_window, rhs_group, col_block)
                plgpu.barrier_wait(bias_bar)
                return epilogue(accs, bias_smem)

            values = pl.run_scoped(
                with_bias,
                plgpu.SMEM((len(half_blocks), bn), dtype),
                plgpu.Barrier(num_arrivals=len(half_blocks)),
            )
            store(out_ref, values, row, shift, count, col_block)

        @pl.when((count > 0) & (group == num_groups))
        def _padding_tile():
            store(out_ref, jnp.zeros((bm, bn), dtype), row, shift, count, col_block)

    return plgpu.kernel(
        grouped_matmul_kernel,
        out_type=jax.ShapeDtypeStruct((padded_m, n_out), dtype),
        grid=(num_tiles * grid_n,),
        grid_names=("item",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )

