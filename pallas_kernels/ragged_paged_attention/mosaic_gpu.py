"""Ragged paged attention for Hopper, written with Mosaic GPU (`plgpu.kernel`).

The unit of work is an *item*: a tile of up to `consumers * n` consecutive query tokens of one
request against one KV head. A consumer warpgroup's rows are the G query heads of that KV head
times its n tokens, padded to 64 rows for wgmma: head-major (row r = g * n + t) for GQA groups
up to 8, token-major (row r = t * G + g) for groups of 16 to 64 that are multiples of 8
(`_token_major`). Decodes are tiles with one token; a prefill chunk is cut into tiles; padded
tokens get tiles with no keys (their output is zero). Decode, prefill and mixed batches all run
through this one kernel.

For decode-like batches the CTAs are persistent, one per SM: `cta_bounds` cuts the items, in
order, into runs of about equal cost (KV blocks), and each CTA runs its run one item after the
other through one K/V ring, so a short decode's start-up (page ids, first TMA, its Q load:
loaded while the item before runs) and its output stores overlap other items' work, and one
long request's heads spread over several SMs. Prefill plans give every item its own CTA, so
the CTAs running at once share one request's K/V in L2.

Per CTA, 1 + `consumers` warpgroups:
  - producer: walks each item's KV blocks (block_kv = pages_per_block pages), reads each page
    id from the block table in GMEM and issues one TMA copy per page for K and for V into a
    `num_slots`-deep SMEM ring; a slot is refilled once every consumer released it;
  - consumers (1 for decode-like batches, 2 for prefill so each K/V block is read once for
    2n tokens, taking turns on the tensor cores): S = Q K^T (wgmma), online softmax in fp32
    (exp2 domain), O += P V (wgmma, P from registers); at the end O / l goes straight into
    `out [T, Hq, D]` with TMA stores: per head in power-of-two boxes of tokens (a tile may end
    anywhere), or per token (token-major rows).

The wrapper turns (cu_q_lens, kv_lens, num_seqs) into a work list of tiles with cheap jnp ops
(`work_list`), so the signature matches the reference; request order does not matter. For a
few long decodes (too few items to fill the SMs) `default_plan` picks split-K: each tile's KV
range is cut into several work rows that write fp32 partials (O and log-sum-exp), merged in jnp.
The new tokens' K/V are written beforehand by `common.write_kv_pages` (a separate scatter).
Attention sinks (`sinks=`, gpt-oss) cost one small SMEM load per consumer and CTA (every KV
head's row sinks) and one exp2 per row at the end; under split-K they join the jnp merge.
FP8 pages (common.py): the ring holds the e4m3 tiles as TMA brings them (half the bytes), and
each consumer upcasts a tile, 64 rows at a time, into its own swizzled SMEM tile in q's dtype
before the wgmma that reads it (both wgmma operands must share a dtype; e4m3 x e4m3 would need
q in fp8 too). The per-tensor scales fold into the logits' scale and the output's 1 / l.

Public names: `ragged_paged_attention_mosaic` (the kernel call; `plan=` runs it with an explicit
`LaunchPlan`), `default_plan` (the plan it picks for a batch shape), `mosaic_unsupported_reason`
(whether a model fits the kernel), and the jnp prologue it runs before the kernel, `work_list`
(columns `WorkColumn`) and `cta_bounds`, public so that tests and benchmarks can check them.

Tested on CPU (tests/kernels): the Mosaic GPU simulator, and the CUDA lowering with jax 0.10.2
and 0.11.2, which also checks the SMEM budget. bench/kernels.py checks and times it on a GPU.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention.common import AttentionParams, validate_inputs

_LOG2E = math.log2(math.e)
# Finite "minus infinity": a row that sees only masked keys keeps a finite max, so
# exp2(s - m) never evaluates inf - inf. Its stray weights are wiped (alpha = 0) by the
# first real key, and a row that never sees one is written as zeros.
_MASKED = -1e30
_ROWS_PER_WGMMA = 64
_LSE_WIDTH = 32  # fp32: 128-byte rows, the SMEM alignment of a TMA box
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def mosaic_unsupported_reason(
    *, dtype, head_dim: int, num_q_heads: int, num_kv_heads: int, page_size: int
) -> str | None:
    """Why the Mosaic GPU kernel cannot serve this model (None: it can)."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _SUPPORTED_DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} is not bf16/fp16"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} is not 64 or 128"
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        return f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    group = num_q_heads // num_kv_heads
    if group > 8 and (group % 8 or group > _ROWS_PER_WGMMA):
        # Above 8 the rows are token-major: each token's G heads must start on an 8-row tile
        # of the Q buffer, and one token's G rows must fit one 64-row wgmma tile.
        return f"GQA group {group} is above 8 and not a multiple of 8 up to {_ROWS_PER_WGMMA}"
    if page_size < 16 or page_size > 128 or page_size & (page_size - 1):
        # Above 128 a page alone is a KV block: two slots of 256 x 128 K and V overflow SMEM.
        return f"page_size {page_size} is not a power of two from 16 to 128"
    return None


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """The static shape of one kernel launch: tile size, KV blocking, warpgroups and CTAs.

    `default_plan` picks one per batch shape; `ragged_paged_attention_mosaic(..., plan=...)` runs
    the kernel with any other (bench/kernels.py tunes them, the tests pin the ones they check).
    Every field is static: a plan is part of the compiled kernel.
    """

    # n: query tokens per tile; for GQA groups up to 8 a power of two >= 8, above 8 any n
    # (the default fills 64 rows: 64 // G).
    tokens_per_tile: int
    pages_per_block: int  # pages per KV block (one pipeline step)
    num_slots: int  # depth of the K/V SMEM ring
    kv_splits: int = 1  # > 1: split-K, each tile's KV range cut into this many work rows, merged in jnp
    consumers: int = 1  # consumer warpgroups per CTA, each with its own n tokens, sharing the K/V ring
    # Two consumers take turns on the tensor cores (FA3's ping-pong): one's softmax runs while
    # the other's QK^T and PV wgmmas do.
    pingpong: bool = False
    # Persistent CTAs; 0: one per SM (at head_dim 128 the SMEM ring leaves room for one; at 64 a
    # decode CTA's buffers add up to ~88 KiB and two would fit: not tried).
    max_ctas: int = 0
    # False: one CTA per item, in order. Prefill plans use it: persistent prefill runs were slower
    # (bench/RESULTS.md), likely because the CTAs running at once span every request, where one
    # CTA per item keeps them on one request's K/V in L2.
    persistent: bool = True

    @property
    def tile_tokens(self) -> int:
        return self.tokens_per_tile * self.consumers

    def rows(self, group: int) -> int:
        return -(-group * self.tokens_per_tile // _ROWS_PER_WGMMA) * _ROWS_PER_WGMMA


def _token_major(group: int) -> bool:
    """How a consumer's rows hold G heads x n tokens: head-major (row g * n + t) up to G = 8,
    token-major (row t * G + g) above.

    NOTE: head-major rows load and store one head's n tokens per TMA box, which must start on an
    8-row tile of the Q buffer, so n >= 8; at G = 16 that is 128 rows, and a consumer's fp32 S
    and O (128 x 128 each at d = 128) would take 256 registers per thread, over the 255 limit.
    Token-major rows load and store one token's G heads per box (contiguous in q [T, Hq, D] and
    out), so G = 16 takes n = 4 tokens in 64 rows: the registers and SMEM of the G = 8 plans.
    """
    return group > 8


def _tile_alignment(tokens_per_tile: int) -> int:
    """Query windows start on multiples of this: 8 for tiles of 8 or more tokens (head-major
    rows: a Q box starts on an 8-row tile of the Q buffer); n for smaller tiles (token-major
    rows, where a window may start on any token), so a request's first window reaches its first
    token."""
    return min(8, tokens_per_tile)


@functools.cache
def _num_sms() -> int:
    """The first GPU's SM count; 132 (H100 and H200 SXM) where there is none: the plans are also
    traced on CPU machines, for the CUDA lowering checks."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except Exception:  # noqa: BLE001 - no GPU backend here (RuntimeError), or no core_count
        return 132


def default_plan(
    *,
    num_tokens: int,
    num_slots: int,
    num_kv_heads: int,
    max_kv_len: int,
    group: int,
    page_size: int,
    head_dim: int,
    sliding_window: int | None = None,
) -> LaunchPlan:
    """The plan `ragged_paged_attention_mosaic` uses for a batch of this static shape.

    num_tokens: T of q [T, Hq, D]; num_slots: S, the request slots; max_kv_len: the longest KV
    length a slot can have (pages_per_seq * page_size); group: query heads per KV head;
    sliding_window: the attention's window, which bounds the keys a decode reads.
    Decode-like batches (T <= 2S) get persistent CTAs, and split-K when a few long requests
    cannot fill the SMs; prefill batches get two ping-pong consumers and one CTA per item.
    """
    # n: G * n rows fill one 64-row wgmma tile where G allows. Head-major rows (G <= 8): a power
    # of two (stores are power-of-two boxes) of >= 8 tokens (Q boxes start on the 8-row tiles
    # of the Q buffer). Token-major rows (G > 8): 64 // G tokens.
    if _token_major(group):
        tokens = _ROWS_PER_WGMMA // group
    else:
        tokens = max(8, 1 << (_ROWS_PER_WGMMA // group).bit_length() - 1)
    block_kv = 64 if head_dim == 128 else 128
    pages_per_block = max(1, block_kv // page_size)
    block_kv = pages_per_block * page_size
    # Split-K when the batch is a few long decodes: too few (request, KV head) tiles to fill
    # the SMs, each with a long KV range. Splitting a prefill tile only adds partial traffic.
    splits = 1
    decode_like = num_tokens <= 2 * num_slots
    sms = _num_sms()
    keys = max_kv_len if sliding_window is None else min(max_kv_len, sliding_window)  # a decode's longest range
    if decode_like and num_slots * num_kv_heads < sms and keys >= 8 * block_kv:
        splits = min(8, -(-2 * sms // (num_slots * num_kv_heads)), keys // (4 * block_kv))
    if decode_like and splits == 1:
        # 128-key blocks in 2 slots: fewer, larger pipeline steps; measured faster than 64-key
        # blocks in 3 slots on the decode shapes (bench/RESULTS.md).
        return LaunchPlan(tokens, max(1, 128 // page_size), num_slots=2)
    if decode_like:
        return LaunchPlan(tokens, pages_per_block, num_slots=3, kv_splits=splits)
    # Prefill: two consumer warpgroups per CTA read each K/V block once for 2n tokens and take
    # turns on the tensor cores; 128-key blocks halve the per-block overhead (barriers, the
    # softmax's row reductions) against 64. Two slots of 128 x 128 K and V fill 128 of the
    # 227 KiB of SMEM.
    prefill_kv = 128
    return LaunchPlan(
        tokens_per_tile=tokens,
        pages_per_block=max(1, prefill_kv // page_size),
        num_slots=2 if head_dim == 128 else 3,
        consumers=2,
        pingpong=True,
        persistent=False,
    )


class _View(NamedTuple):
    """One consumer's share of one item (scalars read from the work list)."""

    head: jax.Array  # KV head
    window: jax.Array  # first token of the consumer's Q window (a multiple of 8)
    token: jax.Array  # first token it owns
    count: jax.Array  # tokens it owns (0: it only releases the item's K/V blocks)
    pos: jax.Array  # position of `token` in its request
    kv_start: jax.Array  # the item's KV blocks: [kv_start, kv_end), unmasked before mask_from
    kv_end: jax.Array
    mask_from: jax.Array
    split: jax.Array | int  # KV split index (split-K), 0 otherwise


class WorkColumn(enum.IntEnum):
    """The columns of `work_list`'s rows, one row per tile (or per KV split of a tile)."""

    SEQ = 0  # request slot
    TOKEN = 1  # first token the tile owns
    COUNT = 2  # tokens it owns (0: a row past the last tile)
    POS = 3  # position of TOKEN in its request
    KV_START = 4  # its KV blocks: [KV_START, KV_END), unmasked before MASK_FROM
    KV_END = 5
    MASK_FROM = 6
    LOAD_FROM = 7  # first token of the query window it loads (a multiple of 8)
    SPLIT = 8  # KV split index (split-K), 0 otherwise


WORK_COLUMNS = len(WorkColumn)


def work_list(
    cu_q_lens: jax.Array,  # [S + 1]
    kv_lens: jax.Array,  # [S]
    num_seqs: jax.Array,  # [1]
    *,
    num_tokens: int,
    tokens_per_tile: int,
    block_kv: int,
    sliding_window: int | None,
    kv_splits: int = 1,
) -> jax.Array:  # [W * kv_splits, WORK_COLUMNS] i32
    """The kernel's work list: every request (and the padded tail of the token axis) cut into
    tiles of <= n tokens, one row per tile, columns as `WorkColumn` (cheap jnp, run before the
    kernel; XLA computes it once per step for all layers).

    A tile loads the query window [load_from, load_from + n), a multiple of min(8, n) tokens
    in (with n >= 8, head-major rows: the TMA box into the 8-row-tiled Q buffer must start on a
    tile row), and owns the tokens [token, token + count) inside it. Segment s < S is request
    s; segment S is the padded tokens past cu_q_lens[num_seqs], whose tiles have an empty KV
    range (zeros out). Tiles past the last real one have count 0. Needs num_tokens % 8 == 0 and
    num_tokens >= n.

    With kv_splits = K > 1 every tile appears K times in a row, each with 1/K of its KV blocks
    and its split index.
    """
    num_slots = kv_lens.shape[0]
    n = tokens_per_tile
    live = jnp.arange(num_slots) < num_seqs[0]
    starts = cu_q_lens[:-1]
    q_lens = jnp.where(live, cu_q_lens[1:] - starts, 0)
    end_live = cu_q_lens[num_seqs[0]]
    seg_start = jnp.concatenate([starts, end_live[None]])  # [S + 1]
    seg_len = jnp.concatenate([q_lens, (num_tokens - end_live)[None]])
    seg_kv = jnp.concatenate([kv_lens, jnp.zeros((1,), jnp.int32)])
    align = _tile_alignment(n)
    seg_window = seg_start // align * align  # first tile's window start
    tiles = jnp.where(seg_len > 0, (seg_start + seg_len - seg_window + n - 1) // n, 0)
    tile_end = jnp.cumsum(tiles)
    # Each segment adds at most one tile beyond T / n, plus one for the window alignment (< 8
    # tokens).
    num_work = (num_tokens + 7 * (num_slots + 1)) // n + num_slots + 2
    w = jnp.arange(num_work, dtype=jnp.int32)
    # NOTE: compare_all, one fused compare-and-count: the default binary search is a while loop,
    # ~log2(N) rounds of tiny kernels on a GPU. (XLA computes this list once per step: the
    # layers' identical copies are merged, loops included.)
    seg = jnp.minimum(jnp.searchsorted(tile_end, w, side="right", method="compare_all"), num_slots)
    seg = seg.astype(jnp.int32)
    local = w - (tile_end[seg] - tiles[seg])
    active = w < tile_end[-1]
    window = seg_window[seg] + local * n
    token = jnp.maximum(window, seg_start[seg])
    count = jnp.where(active, jnp.minimum(window + n, seg_start[seg] + seg_len[seg]) - token, 0)
    is_request = seg < num_slots
    pos = seg_kv[seg] - seg_len[seg] + (token - seg_start[seg])  # position of the tile's first token
    key_end = jnp.where(is_request, jnp.maximum(pos + count, 0), 0)
    key_start = jnp.zeros_like(key_end)
    if sliding_window is not None:
        key_start = jnp.maximum(pos - sliding_window + 1, 0)
    kv_end = (key_end + block_kv - 1) // block_kv
    kv_start = jnp.minimum(key_start // block_kv, kv_end)
    # Blocks before mask_from hold only keys <= every row's position: no mask needed.
    if sliding_window is None:
        mask_from = jnp.clip((pos + 1) // block_kv, kv_start, kv_end)
    else:
        mask_from = kv_start
    load_from = jnp.minimum(window, num_tokens - n)
    split = jnp.zeros_like(w)
    if kv_splits > 1:
        chunk = (kv_end - kv_start + kv_splits - 1) // kv_splits

        def per_split(x):
            return jnp.repeat(x, kv_splits)

        split = jnp.tile(jnp.arange(kv_splits, dtype=jnp.int32), num_work)
        seg, token, count, pos, load_from = map(per_split, (seg, token, count, pos, load_from))
        first = per_split(kv_start) + split * per_split(chunk)
        kv_end = jnp.minimum(first + per_split(chunk), per_split(kv_end))
        kv_start = jnp.minimum(first, kv_end)
        mask_from = jnp.clip(per_split(mask_from), kv_start, kv_end)
    columns = [jnp.minimum(seg, num_slots - 1), token, count, pos, kv_start, kv_end, mask_from, load_from, split]
    return jnp.stack([c.astype(jnp.int32) for c in columns], axis=1)


def cta_bounds(work: jax.Array, *, num_kv_heads: int, num_ctas: int, persistent: bool) -> jax.Array:
    """[num_ctas + 1] i32: the items (work row, KV head) of `work_list`, in order, cut into
    `num_ctas` runs of about equal cost, one per CTA.

    Item i is work row i // Hkv against KV head i % Hkv; CTA p runs items [bounds[p],
    bounds[p + 1]). An item costs its KV blocks plus one (its Q load and output stores), so a
    CTA gets many short decodes or a few long ones, and one long request's heads spread over
    several CTAs. Rows with no tokens (past the last tile) cost nothing and fall after
    bounds[-1]: no CTA visits them. Not `persistent`: one item per CTA.
    """
    active = work[:, WorkColumn.COUNT] > 0
    if not persistent:  # one item per CTA, in order
        num_items = jnp.sum(active, dtype=jnp.int32) * num_kv_heads
        return jnp.minimum(jnp.arange(num_ctas + 1, dtype=jnp.int32), num_items)
    cost = jnp.where(active, work[:, WorkColumn.KV_END] - work[:, WorkColumn.KV_START] + 1, 0)  # [W]
    row_end = jnp.cumsum(cost * num_kv_heads)  # [W]: the cost of rows 0..w, every head
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    item_start = (row_end - cost * num_kv_heads)[:, None] + heads[None, :] * cost[:, None]  # [W, Hkv]
    middles = (2 * item_start + cost[:, None]).reshape(-1)  # twice each item's midpoint (nondecreasing)
    # CTA p takes the items whose midpoint falls in [p, p + 1) * total / num_ctas (floored).
    # (p * 2 total) // num_ctas, without forming p * 2 total (int32: long contexts overflow it)
    per_cta, rest = jnp.divmod(2 * row_end[-1], num_ctas)
    p = jnp.arange(num_ctas + 1, dtype=jnp.int32)
    targets = p * per_cta + p * rest // num_ctas
    return jnp.searchsorted(middles, targets, side="left", method="compare_all").astype(jnp.int32)


def _k_transposed(k_slot, kt_scratch):
    """The B operand of S = Q K^T.

    NOTE: on the GPU wgmma reads K^T straight from the K tile (a transposed ref view). The CPU
    simulator (jax 0.10.2) cannot interpret a transposed wgmma operand, so there we copy the
    tile transposed into a scratch buffer first; `kt_scratch` is None on the GPU path.
    """
    if kt_scratch is None:
        return k_slot.transpose((1, 0))  # `plgpu.transpose_ref` is deprecated in jax 0.11
    kt_scratch[...] = k_slot[...].T
    return kt_scratch


_UPCAST_ROWS = 64  # rows of an FP8 tile upcast at once: 64 fp32 registers per thread at d = 128


def _upcast_into(tile, fp8_slot) -> None:
    """An e4m3 K or V tile [block_kv, D] (plain SMEM, as TMA wrote it) into `tile` (swizzled, in
    the wgmma's dtype), 64 rows at a time; exact: every e4m3 value is a bf16 and an f16 value.

    NOTE: through f32 because Mosaic converts e4m3 to f16 everywhere but to bf16 only with a
    ptxas of PTX ISA 9.2 or newer; e4m3 -> f32 is that f16 conversion and one more."""
    for start in range(0, tile.shape[0], _UPCAST_ROWS):
        rows = pl.ds(start, _UPCAST_ROWS)
        tile[rows] = fp8_slot[rows].astype(jnp.float32).astype(tile.dtype)
    plgpu.commit_smem()


def _swizzled(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    minor_bytes = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = min(128, minor_bytes)
    elems = swizzle // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _build_kernel(
    *,
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    num_pages: int,
    pages_per_seq: int,
    num_ctas: int,
    dtype,
    kv_dtype,
    plan: LaunchPlan,
    params: AttentionParams,
    with_sinks: bool,
    simulate: bool,
    interpret,
):
    """The kernel; with_sinks: it takes a sixth input, `sink_rows` [Hkv, rows] f32 (each row's
    sink logit in the exp2 domain) and adds the sink to every row's softmax denominator.
    kv_dtype: the pages'; other than `dtype` (FP8 pages), tiles are upcast before each wgmma."""
    group = num_q_heads // num_kv_heads
    n = plan.tokens_per_tile
    rows = plan.rows(group)
    ppb = plan.pages_per_block
    block_kv = ppb * page_size
    slots = plan.num_slots
    upcast = jnp.dtype(kv_dtype) != jnp.dtype(dtype)
    scale = params.sm_scale * params.k_scale if upcast else params.sm_scale
    out_scale = params.v_scale if upcast else 1.0
    soft_cap = params.soft_cap
    sliding_window = params.sliding_window
    splits = plan.kv_splits
    consumers = plan.consumers
    by_token = _token_major(group)
    # Q copies per item (each arrives on the item's Q barrier): one per token or one per head.
    q_copies = n if by_token else group
    # Decode items are short: the next item's queries load while one runs. Prefill plans run
    # one item per CTA (persistent=False), where a second buffer would go unused.
    q_buffers = 2 if consumers == 1 else 1

    def scores(s, pos_first, kv_block, masked: bool):
        """fp32 logits in the exp2 domain, masked where a row may not see a key."""
        if soft_cap is None:
            s = s * (scale * _LOG2E)
        else:
            s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * _LOG2E)
        if masked:
            row = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
            col = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
            q_pos = pos_first + (lax.div(row, group) if by_token else lax.rem(row, n))
            k_pos = kv_block * block_kv + col
            ok = k_pos <= q_pos
            if sliding_window is not None:
                ok = ok & (k_pos > q_pos - sliding_window)
            s = jnp.where(ok, s, _MASKED)
        return s

    def rendezvous(turn):
        """Both consumers meet here (`turn` is None without ping-pong: nothing to do)."""
        if turn is not None:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def view(work_ref, i, c):
        """Consumer c's share of item i: work row i // Hkv (a tile, or one KV split of it) for
        KV head i % Hkv."""
        w, head = lax.div(i, num_kv_heads), lax.rem(i, num_kv_heads)
        columns = (WorkColumn.TOKEN, WorkColumn.COUNT, WorkColumn.POS)
        tile_token, tile_count, tile_pos = (work_ref[w, k] for k in columns)
        window = pl.multiple_of(work_ref[w, WorkColumn.LOAD_FROM] + c * n, _tile_alignment(n))
        token = jnp.maximum(tile_token, window)
        return _View(
            head=head,
            window=window,
            token=token,
            count=jnp.maximum(jnp.minimum(tile_token + tile_count, window + n) - token, 0),
            pos=tile_pos + (token - tile_token),
            kv_start=work_ref[w, WorkColumn.KV_START],
            kv_end=work_ref[w, WorkColumn.KV_END],
            mask_from=work_ref[w, WorkColumn.MASK_FROM],
            split=work_ref[w, WorkColumn.SPLIT] if splits > 1 else 0,
        )

    def consumer(c, first, last, work_ref, out_refs, q_ref, smem, bars, sinks):
        """Consumer warpgroup c: items [first, last), each its window's tokens against one KV head."""
        q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem, kv_tile = smem
        q_bar, k_bar, v_bar, k_free, v_free, turn = bars
        q_smem, o_smem = q_smem.at[c], o_smem.at[c]
        p_smem, lse_smem, kt_smem = (None if r is None else r.at[c] for r in (p_smem, lse_smem, kt_smem))
        kv_tile = None if kv_tile is None else kv_tile[c]
        if turn is not None:
            plgpu.set_max_registers(232, action="increase")
        sink_smem = None
        if sinks is not None:  # every KV head's row sinks, once per CTA
            sink_ref, sink_smem, sink_bar = sinks
            sink_smem = sink_smem.at[c]
            plgpu.copy_gmem_to_smem(sink_ref, sink_smem, sink_bar.at[c])
            plgpu.barrier_wait(sink_bar.at[c])

        # NOTE: ping-pong. Consumer 1 starts one meeting behind consumer 0 and consumer 0 ends
        # with one more, so in every block one consumer's softmax runs between the other's
        # QK^T issue and its PV issue: the tensor cores see QK0(c0) QK0(c1) PV0(c0) QK1(c0)
        # PV0(c1) QK1(c1) ... Both meet twice per KV block, also when one has no tokens here.
        if c == 1:
            rendezvous(turn)

        def load_q(v, buf):
            if by_token:

                @pl.loop(0, n)
                def _load_token(t):
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[v.window + t, pl.ds(v.head * group, group)],
                        q_smem.at[buf, pl.ds(pl.multiple_of(t * group, 8), group)],
                        q_bar.at[c * q_buffers + buf],
                    )

                return

            @pl.loop(0, group)
            def _load_head(g):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[pl.ds(v.window, n), v.head * group + g],
                    q_smem.at[buf, pl.ds(pl.multiple_of(g * n, 8), n)],
                    q_bar.at[c * q_buffers + buf],
                )

        if q_buffers > 1:
            # Each item's queries load while the item before it runs.
            @pl.when(first < last)
            def _first_q():
                v = view(work_ref, first, c)
                pl.when(v.count > 0)(lambda: load_q(v, 0))

        def item(i, ring):
            """One item; `ring` counts the K/V blocks this CTA consumed before it."""
            v = view(work_ref, i, c)
            buf = lax.rem(i - first, q_buffers)
            if q_buffers > 1:
                # Into the buffer of the item before, whose wgmmas are done; issued whether or
                # not this item has tokens for us, so every load has its wait and vice versa.
                @pl.when(i + 1 < last)
                def _next_q():
                    v_next = view(work_ref, i + 1, c)
                    pl.when(v_next.count > 0)(lambda: load_q(v_next, 1 - buf))

            @pl.when(v.count > 0)
            def _attend():
                if q_buffers == 1:
                    load_q(v, buf)
                plgpu.barrier_wait(q_bar.at[c * q_buffers + buf])
                attend(v, ring, q_smem.at[buf], k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem, kv_tile, sink_smem,
                       bars, out_refs)

            # A warpgroup with no tokens in this item (a decode next to a prefill) only passes
            # the K/V blocks on: the producer waits for every consumer's release.
            @pl.when(v.count == 0)
            def _release_only():
                @pl.loop(0, v.kv_end - v.kv_start)
                def _release(b):
                    slot = lax.rem(ring + b, slots)
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    rendezvous(turn)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    rendezvous(turn)

            return ring + (v.kv_end - v.kv_start)

        lax.fori_loop(first, last, item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)
        if c == 0:
            rendezvous(turn)

    def attend(v, ring, q_i, k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem, kv_tile, sink_smem, bars,
               out_refs):
        """Online softmax over the item's KV blocks, then its rows of O (and LSE) to GMEM.
        kv_tile: this consumer's upcast K, then V, tile (FP8 pages), else None."""
        _, k_bar, v_bar, k_free, v_free, turn = bars
        shift = v.token - v.window  # our tokens: [shift, shift + count) of the window's
        pos_first = v.pos - shift  # position of the window's first token
        ring = ring - v.kv_start  # the ring position of block kv_block is ring + kv_block

        def step(kv_block, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(ring + kv_block, slots)
            plgpu.barrier_wait(k_bar.at[slot])
            k_tile = k_smem.at[slot]
            if kv_tile is not None:  # the last block's P V, which read kv_tile, is done
                _upcast_into(kv_tile, k_tile)
                k_tile = kv_tile

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_i, _k_transposed(k_tile, kt_smem))
                rendezvous(turn)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = scores(s, pos_first, kv_block, masked)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(dtype)
            if turn is not None:
                # The softmax is done before the other consumer is let onto the tensor cores.
                acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
                plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_bar.at[slot])
            if turn is not None:
                plgpu.barrier_wait(turn)
            v_tile = v_smem.at[slot]
            if kv_tile is not None:  # QK^T, which read kv_tile, is done (its scores were read)
                _upcast_into(kv_tile, v_tile)
                v_tile = kv_tile
            acc = add_pv(acc, p, v_tile, p_smem)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        carry = (
            jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), _MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        carry = lax.fori_loop(v.kv_start, v.mask_from, functools.partial(step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(v.mask_from, v.kv_end, functools.partial(step, masked=True), carry)
        seen = m_i > 0.5 * _MASKED  # rows that saw at least one key
        if sink_smem is None:
            inv = jnp.where(seen, out_scale / jnp.where(seen, l_i, 1.0), 0.0)
        else:
            # The sink's exp2(sink - m) joins the sum; a row that saw no key has m = _MASKED, so
            # that term is inf and the row is written as zeros.
            inv = out_scale / (l_i + jnp.exp2(sink_smem[v.head] - m_i))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores read o/lse
        o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
        stores = [(o_smem, out_refs[0])]
        if splits > 1:
            # log2-sum-exp2 of the row's scores in this split; rows that saw no key weigh 0.
            lse = jnp.where(seen, m_i + jnp.log2(jnp.where(seen, l_i, 1.0)), _MASKED)
            lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
            stores.append((lse_smem, out_refs[1]))
        plgpu.commit_smem()
        if splits > 1:
            stores = [(smem, gmem.at[v.split]) for smem, gmem in stores]
        if by_token:

            @pl.loop(0, v.count)
            def _store_token(t):
                for smem, gmem in stores:
                    plgpu.copy_smem_to_gmem(
                        smem.at[pl.ds((shift + t) * group, group)],
                        gmem.at[v.token + t, pl.ds(v.head * group, group)],
                    )

            return

        @pl.loop(0, group)
        def _store_head(g):
            for smem, gmem in stores:
                done = jnp.int32(0)
                size = n
                while size:
                    # TMA boxes have static sizes: store `count` rows as a sum of powers of two.
                    @pl.when((v.count & size) != 0)
                    def _store_rows(smem=smem, gmem=gmem, done=done, size=size):
                        plgpu.copy_smem_to_gmem(
                            smem.at[pl.ds(g * n + shift + done, size)],
                            gmem.at[pl.ds(v.token + done, size), v.head * group + g],
                        )

                    done = done + (v.count & size)
                    size //= 2

    def producer(first, last, work_ref, page_indices_ref, kv_ref, k_smem, v_smem, bars):
        """Streams the KV blocks of items [first, last) through the ring, one after the other."""
        _, k_bar, v_bar, k_free, v_free, turn = bars
        if turn is not None:
            plgpu.set_max_registers(40, action="decrease")

        def item(i, ring):
            w, head = lax.div(i, num_kv_heads), lax.rem(i, num_kv_heads)
            seq, kv_start, kv_end = (work_ref[w, k] for k in (WorkColumn.SEQ, WorkColumn.KV_START, WorkColumn.KV_END))

            @pl.loop(0, kv_end - kv_start)
            def _fetch(b):
                slot = lax.rem(ring + b, slots)
                kv_block = kv_start + b
                for kv, smem, bar, free in ((0, k_smem, k_bar, k_free), (1, v_smem, v_bar, v_free)):

                    @pl.when(ring + b >= slots)
                    def _wait_free(free=free):
                        plgpu.barrier_wait(free.at[slot])

                    @pl.loop(0, ppb)
                    def _fetch_page(j, kv=kv, smem=smem, bar=bar):
                        entry = jnp.minimum(kv_block * ppb + j, pages_per_seq - 1)
                        page = jnp.clip(page_indices_ref[seq, entry], 0, num_pages - 1)
                        rows_j = pl.multiple_of(j * page_size, page_size)
                        plgpu.copy_gmem_to_smem(
                            kv_ref.at[kv, head, page], smem.at[slot, pl.ds(rows_j, page_size)], bar.at[slot]
                        )

            return ring + (kv_end - kv_start)

        total = lax.fori_loop(first, last, item, jnp.int32(0))

        # Observe the consumers' releases of the last slots too, so every barrier phase has a
        # waiter (the simulator checks this; on the GPU it only delays the idle producer's exit).
        @pl.loop(jnp.maximum(total - slots, 0), total)
        def _drain(b):
            slot = lax.rem(b, slots)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

    def body(work_ref, bounds_ref, page_indices_ref, q_ref, kv_ref, *refs):
        sink_ref = None
        if with_sinks:
            sink_ref, *refs = refs
        out_refs = refs[: len(out_type)]
        *smem, bars, sink_scratch = refs[len(out_type) :]
        k_smem, v_smem = smem[1], smem[2]
        sinks = None if sink_ref is None else (sink_ref, *sink_scratch)
        cta = lax.axis_index("cta")
        first, last = bounds_ref[cta], bounds_ref[cta + 1]
        wg = lax.axis_index("wg")
        for c in range(consumers):
            pl.when(wg == c)(lambda c=c: consumer(c, first, last, work_ref, out_refs, q_ref, smem, bars, sinks))

        @pl.when(wg == consumers)
        def _produce():
            producer(first, last, work_ref, page_indices_ref, kv_ref, k_smem, v_smem, bars)

    out_type = [jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype)]
    # Per split: normalised O and the rows' log2-sum-exp2, _LSE_WIDTH wide.
    # NOTE: a TMA box's SMEM rows must start 128-byte aligned; 8-wide fp32 rows (32 bytes) gave
    # CUDA_ERROR_MISALIGNED_ADDRESS on the H200.
    if splits > 1:
        out_type = [
            jax.ShapeDtypeStruct((splits, num_tokens, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_tokens, num_q_heads, _LSE_WIDTH), jnp.float32),
        ]
    scratch = [
        _swizzled((consumers, q_buffers, rows, head_dim), dtype),  # q
        # The K and V rings: FP8 tiles stay as TMA writes them (plain), for the upcast to read.
        plgpu.SMEM((slots, block_kv, head_dim), kv_dtype) if upcast else _swizzled((slots, block_kv, head_dim), dtype),
        plgpu.SMEM((slots, block_kv, head_dim), kv_dtype) if upcast else _swizzled((slots, block_kv, head_dim), dtype),
        _swizzled((consumers, rows, block_kv), dtype) if simulate else None,  # p (registers on the GPU)
        plgpu.SMEM((consumers, rows, head_dim), out_type[0].dtype),  # o staging (untiled: row-granular TMA stores)
        plgpu.SMEM((consumers, rows, _LSE_WIDTH), jnp.float32) if splits > 1 else None,
        plgpu.SMEM((consumers, head_dim, block_kv), dtype) if simulate else None,
        # kv_tile: each consumer's upcast tile, a buffer of its own (a wgmma inside run_state cannot
        # take a ref indexed by a constant)
        tuple(_swizzled((block_kv, head_dim), dtype) for _ in range(consumers)) if upcast else None,
        (
            plgpu.Barrier(num_arrivals=q_copies, num_barriers=consumers * q_buffers),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=slots),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=slots),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
            plgpu.Barrier(num_arrivals=2) if plan.pingpong else None,  # the consumers' turns
        ),
        # Each consumer's copy of sink_rows, and its barrier.
        (
            (plgpu.SMEM((consumers, num_kv_heads, rows), jnp.float32), plgpu.Barrier(num_barriers=consumers))
            if with_sinks
            else None
        ),
    ]
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=consumers + 1,
        thread_name="wg",
        # approx_math: ex2.approx for the softmax (and tanh.approx for the soft-cap), as FA3 does.
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True
        ),
        interpret=interpret,
    )


def add_pv(acc: jax.Array, p: jax.Array, v_slot, p_smem) -> jax.Array:
    """acc [rows, cols] f32 + P V, inside a kernel: P from registers on the GPU; through SMEM in the
    simulator (p_smem, None on the GPU). MLA's kernel takes it too."""
    if p_smem is None:

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_slot)

        return pl.run_state(pv)(plgpu.ACC.init(acc))
    # NOTE: jax 0.10.2's simulator reads wgmma operands from SMEM only, and does not
    # interpret run_state: the same product, staged.
    p_smem[...] = p
    plgpu.commit_smem()

    def pv_staged(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_slot)
        return acc_ref[...]

    return acc + pl.run_scoped(pv_staged, plgpu.ACC(acc.shape, jnp.float32))


def ragged_paged_attention_mosaic(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    params: AttentionParams,
    *,
    sinks: jax.Array | None = None,  # [Hq]
    plan: LaunchPlan | None = None,
    interpret=None,
) -> jax.Array:  # [T, Hq, D]
    """Ragged paged attention on Hopper; same contract as `ragged_paged_attention_reference`.

    `sinks`: the attention sinks (common.py). One work row per tile: each row's sink joins its
    softmax denominator in the kernel. Split-K: in the merge of the splits, the kernel unchanged.
    `kv_pages` in q's dtype, or FP8 (e4m3) pages with `params.k_scale` / `v_scale` (common.py).

    `plan`: the launch plan; None takes `default_plan` for these shapes (what the engine runs).
    Any other plan computes the same result and may be faster or slower (bench/kernels.py
    --tune); it must keep KV blocks a multiple of 64 tokens and fit the SMEM (checked when the
    kernel lowers). `interpret`: None/False compiles for the GPU; True or an
    `InterpretGPUParams` runs the Mosaic GPU simulator on CPU (tests).
    """
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sinks)
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_pages.shape
    reason = mosaic_unsupported_reason(
        dtype=q.dtype, head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, page_size=page_size
    )
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU ragged paged attention: {reason}")
    simulate = interpret is not None and interpret is not False
    if interpret is True:
        interpret = _simulator_params()
    group = num_q_heads // num_kv_heads
    plan = plan or default_plan(
        num_tokens=num_tokens,
        num_slots=kv_lens.shape[0],
        num_kv_heads=num_kv_heads,
        max_kv_len=page_indices.shape[1] * page_size,
        group=group,
        page_size=page_size,
        head_dim=head_dim,
        sliding_window=params.sliding_window,
    )
    if (plan.pages_per_block * page_size) % 64:
        raise ValueError(f"KV blocks must be a multiple of 64 tokens (wgmma tiling), got {plan}")
    if plan.pingpong and plan.consumers != 2:
        raise ValueError(f"ping-pong needs two consumer warpgroups, got {plan}")
    padded_tokens = max(-(-num_tokens // 8) * 8, plan.tile_tokens)
    q_in = q if padded_tokens == num_tokens else jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    block_kv = plan.pages_per_block * page_size
    work = work_list(
        cu_q_lens,
        kv_lens,
        num_seqs,
        num_tokens=padded_tokens,
        tokens_per_tile=plan.tile_tokens,
        block_kv=block_kv,
        sliding_window=params.sliding_window,
        kv_splits=plan.kv_splits,
    )
    num_items = work.shape[0] * num_kv_heads
    num_ctas = min(plan.max_ctas or _num_sms(), num_items) if plan.persistent else num_items
    bounds = cta_bounds(work, num_kv_heads=num_kv_heads, num_ctas=num_ctas, persistent=plan.persistent)
    in_kernel_sinks = sinks is not None and plan.kv_splits == 1
    kernel = _build_kernel(
        num_tokens=padded_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        num_pages=num_pages,
        pages_per_seq=page_indices.shape[1],
        num_ctas=num_ctas,
        dtype=q.dtype,
        kv_dtype=kv_pages.dtype,
        plan=plan,
        params=params,
        with_sinks=in_kernel_sinks,
        simulate=simulate,
        interpret=interpret,
    )
    inputs = [work, bounds, page_indices, q_in, kv_pages]
    if in_kernel_sinks:
        inputs.append(_sink_rows(sinks, num_kv_heads=num_kv_heads, plan=plan))
    outs = kernel(*inputs)
    if plan.kv_splits == 1:
        return outs[0][:num_tokens]
    return _merge_splits(*outs, sinks)[:num_tokens].astype(q.dtype)


def _sink_rows(sinks: jax.Array, *, num_kv_heads: int, plan: LaunchPlan) -> jax.Array:
    """sinks [Hq] -> [Hkv, rows] f32: the sink of each consumer row's query head, in the exp2
    domain; rows past the G x n real ones take the last head's (they are never stored)."""
    group = sinks.shape[0] // num_kv_heads
    n = plan.tokens_per_tile
    row = np.arange(plan.rows(group))
    head = row % group if _token_major(group) else np.minimum(row // n, group - 1)
    return (sinks.astype(jnp.float32) * _LOG2E).reshape(num_kv_heads, group)[:, head]


def _merge_splits(o_parts: jax.Array, lse_parts: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """o_parts [K, T, Hq, D], lse_parts [K, T, Hq, _LSE_WIDTH] (log2 domain), sinks None or
    [Hq] -> [T, Hq, D] fp32.

    A split that saw no key has lse = _MASKED and o = 0: it weighs nothing next to one that
    did, and a token no split served (padding) comes out 0, not 0/0 (with sinks: 0 / inf).
    """
    lse = lse_parts[..., 0]  # [K, T, Hq]
    top = lse.max(axis=0)  # [T, Hq]
    weight = jnp.exp2(lse - top)  # [K, T, Hq]
    # NOTE: a product and a sum, not einsum: a GPU f32 dot may round through TF32.
    merged = (weight[..., None] * o_parts).sum(axis=0)  # [T, Hq, D]
    denom = weight.sum(axis=0)  # [T, Hq]
    if sinks is not None:
        denom = denom + jnp.exp2(sinks.astype(jnp.float32) * _LOG2E - top)
    return merged / denom[..., None]


def _simulator_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
