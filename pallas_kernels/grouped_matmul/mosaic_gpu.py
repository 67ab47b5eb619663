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

Plans (`default_plan`): decode-sized groups (memory-bound: every touched expert's weights are
streamed once) get 64-row tiles and 64-column blocks, so even 8 rows spread over 8 experts make
~100+ CTAs; prefill-sized groups get 128 x 128 tiles. Both keep SMEM under half of the 227 KiB,
so two CTAs share an SM and one's epilogue overlaps the other's loads.

Tested on CPU (tests/kernels/test_grouped_matmul.py): the Mosaic GPU simulator against the
reference, and the CUDA lowering of the decode and prefill plans. bench/grouped_matmul.py times it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.common import (
    Activation,
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

    def smem_bytes(self, itemsize: int, num_weight_blocks: int) -> int:
        step = (self.block_m + num_weight_blocks * self.block_n) * self.block_k * itemsize
        return max(self.num_stages * step, self.block_m * self.block_n * itemsize)


def default_plan(*, m: int, k: int, n: int, num_groups: int, activation: Activation | None) -> Plan:
    """The plan `grouped_matmul_mosaic` uses for this static problem shape (n: rhs columns)."""
    n_out = output_columns(n, activation)
    weight_blocks = 1 if activation is None else 2
    if m <= _DECODE_ROWS_PER_GROUP * num_groups:
        block_m, block_n = 64, 64
    elif activation is None and n_out % 128 == 0:
        block_m, block_n = 128, 128
    else:
        # With an activation a CTA holds two accumulators (gate and up): 128 x 64 each.
        block_m, block_n = 128, 64
    block_k = 64
    step = (block_m + weight_blocks * block_n) * block_k * 2
    stages = max(2, min(6, _SMEM_PER_CTA // step))
    return Plan(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=stages)


def grouped_matmul_mosaic(
    lhs: jax.Array,  # [M, K]
    rhs: jax.Array,  # [E, K, N]
    group_sizes: jax.Array,  # [E] i32
    *,
    bias: jax.Array | None = None,  # [E, N]
    activation: Activation | None = None,
    plan: Plan | None = None,
    interpret=None,
) -> jax.Array:  # [M, N] or [M, N / 2]
    """Same contract as `grouped_matmul_reference`; padding rows come out zero. bf16/fp16 only
    (see `mosaic_unsupported_reason`); a bias is used in lhs's dtype.

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
    if rhs.dtype != lhs.dtype:
        raise ValueError(f"lhs ({lhs.dtype}) and rhs ({rhs.dtype}) must share a dtype")
    if bias is not None:
        bias = bias.astype(lhs.dtype)  # [E, N]; the epilogue adds it in fp32
    plan = plan or default_plan(m=m, k=k, n=n, num_groups=num_groups, activation=activation)
    n_out = output_columns(n, activation)
    if k % plan.block_k or n_out % plan.block_n:
        raise ValueError(f"{plan} does not tile K={k} and {n_out} output columns")
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
        activation=activation,
        plan=plan,
        interpret=interpret,
    )
    args = (tiles, lhs_in, rhs) + ((bias,) if bias is not None else ())
    out = kernel(*args)  # [padded_m, n_out]
    return out if padded_m == m else out[:m]


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
        """fp32 [bm, bn] accumulators, one per weight block, of lhs_window @ rhs_group blocks."""
        specs = [plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=lhs_transforms, delay_release=1)]
        for offset in half_blocks:
            specs.append(
                plgpu.BlockSpec(
                    (bk, bn), lambda kk, offset=offset: (kk, col_block + offset), transforms=rhs_transforms,
                    delay_release=1,
                )
            )

        def scope(*accs):
            def step(_, lhs_smem, *rhs_smems):
                for acc, rhs_smem in zip(accs, rhs_smems, strict=True):
                    plgpu.wgmma(acc, lhs_smem, rhs_smem)
                # The step before's wgmmas are done (this step's may run on): the pipeline refills
                # their slots next (delay_release=1).
                plgpu.wgmma_wait(len(accs))

            plgpu.emit_pipeline(step, grid=(k // bk,), in_specs=specs, max_concurrent_steps=plan.num_stages)(
                lhs_window, *([rhs_group] * len(half_blocks))
            )
            return tuple(acc[...] for acc in accs)

        return pl.run_scoped(scope, *[plgpu.ACC((bm, bn), jnp.float32) for _ in half_blocks])

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

    def grouped_matmul_kernel(tiles_ref, lhs_ref, rhs_ref, *refs):  # its name is the CUDA kernel's
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
            rhs_group = rhs_ref.at[group]  # [K, N]
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

