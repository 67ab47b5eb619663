"""Ragged paged attention for Hopper, written with Mosaic GPU (`plgpu.kernel`).

One CTA computes one *tile*: up to `consumers * n` consecutive query tokens of one request
against one KV head. A consumer warpgroup's rows are the G query heads of that KV head times
its n tokens, head-major (row r = g * n + t), padded to 64 rows for wgmma. Decodes are tiles
with one token; a prefill chunk is cut into tiles; padded tokens get tiles with no keys (their
output is zero). Decode, prefill and mixed batches all run through this one kernel.

Per CTA, 1 + `consumers` warpgroups:
  - producer: walks the tile's KV blocks (block_kv = pages_per_block pages), reads each page
    id from the block table in GMEM and issues one TMA copy per page for K and for V into a
    `num_slots`-deep SMEM ring; a slot is refilled once every consumer released it;
  - consumers (1 for decode-like batches, 2 for prefill so each K/V block is read once for
    2n tokens): S = Q K^T (wgmma), online softmax in fp32 (exp2 domain), P staged in SMEM,
    O += P V (wgmma); at the end O / l goes straight into `out [T, Hq, D]` with power-of-two
    TMA stores (a tile may end anywhere).

The wrapper turns (cu_q_lens, kv_lens, num_seqs) into a work list of tiles with cheap jnp ops
(`_work_list`), so the signature matches the reference; request order does not matter. For a
few long decodes (too few tiles to fill the SMs) `_plan` picks split-K: each tile's KV range
is cut over several CTAs that write fp32 partials (O and log-sum-exp), merged in jnp.
The new tokens' K/V are written beforehand by `common.write_kv_pages` (a separate scatter).

Tested on CPU (tests/kernels): the Mosaic GPU simulator, and the CUDA lowering with jax 0.10.2
and 0.11.2, which also checks the SMEM budget. bench/kernels.py checks and times it on a GPU.
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
    if group > 8:
        return f"GQA group {group} is larger than 8"
    if page_size < 16 or page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two >= 16"
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shape of one kernel launch."""

    tokens_per_tile: int  # n: query tokens per tile (power of two, >= 8)
    pages_per_block: int  # pages per KV block (one pipeline step)
    num_slots: int  # depth of the K/V SMEM ring
    kv_splits: int = 1  # > 1: split-K, each tile's KV range cut into this many CTAs, merged in jnp
    consumers: int = 1  # consumer warpgroups per CTA, each with its own n tokens, sharing the K/V ring
    # Two consumers take turns on the tensor cores (FA3's ping-pong): one's softmax runs while
    # the other's QK^T and PV wgmmas do.
    pingpong: bool = False
    # KV heads per CTA, one after the other through the same K/V ring: a short decode's CTA
    # otherwise spends much of its life starting up (Q load, first page ids, first TMA) and
    # finishing (output stores), with nothing overlapping them.
    heads_per_cta: int = 1

    @property
    def tile_tokens(self) -> int:
        return self.tokens_per_tile * self.consumers

    def rows(self, group: int) -> int:
        return -(-group * self.tokens_per_tile // _ROWS_PER_WGMMA) * _ROWS_PER_WGMMA


# NOTE: the split-K choice needs the SM count at trace time, where no device may be at hand
# (CPU lowering checks); H100 and H200 both have 132.
_NUM_SMS = 132
_MIN_CTAS = _NUM_SMS * 9 // 10  # decode CTAs worth keeping (fewer, longer CTAs measured faster down to this)


def _plan(
    *, num_tokens: int, num_slots: int, num_kv_heads: int, max_kv_len: int, group: int, page_size: int, head_dim: int
) -> _Plan:
    # n: a power of two (stores are power-of-two boxes) of >= 8 tokens (Q boxes start on the
    # 8-row tiles of the Q buffer); G * n rows fill one 64-row wgmma tile where G allows.
    tokens = max(8, 1 << (_ROWS_PER_WGMMA // group).bit_length() - 1)
    block_kv = 64 if head_dim == 128 else 128
    pages_per_block = max(1, block_kv // page_size)
    block_kv = pages_per_block * page_size
    # Split-K when the batch is a few long decodes: too few (request, KV head) tiles to fill
    # the SMs, each with a long KV range. Splitting a prefill tile only adds partial traffic.
    splits = 1
    decode_like = num_tokens <= 2 * num_slots
    if decode_like and num_slots * num_kv_heads < _NUM_SMS and max_kv_len >= 8 * block_kv:
        splits = min(8, -(-2 * _NUM_SMS // (num_slots * num_kv_heads)), max_kv_len // (4 * block_kv))
    if decode_like and splits == 1:
        # Several KV heads per CTA, 128-key blocks in 2 slots, while the batch still fills about
        # one wave of CTAs: on the H200 (2026-12-04) 256 decodes x 512 keys took 162 us against
        # 201 us with one head per CTA and 64-key blocks in 3 slots; 128 x 512, 95 against 114.
        ppb = max(1, 128 // page_size)
        hpc = 1
        while hpc < 8 and num_kv_heads % (2 * hpc) == 0 and num_slots * num_kv_heads // (2 * hpc) >= _MIN_CTAS:
            hpc *= 2
        return _Plan(tokens, ppb, num_slots=2, heads_per_cta=hpc)
    if decode_like:
        return _Plan(tokens, pages_per_block, num_slots=3, kv_splits=splits)
    # Prefill: two consumer warpgroups per CTA read each K/V block once for 2n tokens and take
    # turns on the tensor cores; 128-key blocks halve the per-block overhead (barriers, the
    # softmax's row reductions) against 64. Two slots of 128 x 128 K and V fill 128 of the
    # 227 KiB of SMEM.
    prefill_kv = 128
    return _Plan(
        tokens_per_tile=tokens,
        pages_per_block=max(1, prefill_kv // page_size),
        num_slots=2 if head_dim == 128 else 3,
        consumers=2,
        pingpong=True,
    )


# Columns of the work list, one row per CTA (a tile, or one KV split of a tile).
_W_SEQ, _W_TOKEN, _W_COUNT, _W_POS, _W_KV_START, _W_KV_END, _W_MASK_FROM, _W_LOAD_FROM, _W_SPLIT = range(9)
_W_COLS = 9


def _work_list(
    cu_q_lens: jax.Array,  # [S + 1]
    kv_lens: jax.Array,  # [S]
    num_seqs: jax.Array,  # [1]
    *,
    num_tokens: int,
    tokens_per_tile: int,
    block_kv: int,
    sliding_window: int | None,
    kv_splits: int = 1,
) -> jax.Array:  # [W * kv_splits, _W_COLS] i32
    """Cut every request (and the padded tail of the token axis) into tiles of <= n tokens.

    A tile loads the query window [load_from, load_from + n), a multiple of 8 tokens in (the
    TMA box into the 8-row-tiled Q buffer must start on a tile row), and owns the tokens
    [token, token + count) inside it. Segment s < S is request s; segment S is the padded
    tokens past cu_q_lens[num_seqs], whose tiles have an empty KV range (zeros out). Tiles past
    the last real one have count 0. Needs num_tokens % 8 == 0 and num_tokens >= n.

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
    seg_window = seg_start // 8 * 8  # first tile's window start
    tiles = jnp.where(seg_len > 0, (seg_start + seg_len - seg_window + n - 1) // n, 0)
    tile_end = jnp.cumsum(tiles)
    # Each segment adds at most one tile beyond T / n, plus one for the window alignment.
    num_work = (num_tokens + 7 * (num_slots + 1)) // n + num_slots + 2
    w = jnp.arange(num_work, dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(tile_end, w, side="right"), num_slots).astype(jnp.int32)
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
    num_work: int,
    dtype,
    plan: _Plan,
    params: AttentionParams,
    simulate: bool,
    interpret,
):
    group = num_q_heads // num_kv_heads
    n = plan.tokens_per_tile
    rows = plan.rows(group)
    ppb = plan.pages_per_block
    block_kv = ppb * page_size
    slots = plan.num_slots
    scale = params.sm_scale
    soft_cap = params.soft_cap
    window = params.sliding_window
    hpc = plan.heads_per_cta
    q_buffers = 2 if hpc > 1 else 1

    def scores(s, pos_first, kv_block, masked: bool):
        """fp32 logits in the exp2 domain, masked where a row may not see a key."""
        if soft_cap is None:
            s = s * (scale * _LOG2E)
        else:
            s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * _LOG2E)
        if masked:
            row = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
            col = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
            q_pos = pos_first + lax.rem(row, n)
            k_pos = kv_block * block_kv + col
            ok = k_pos <= q_pos
            if window is not None:
                ok = ok & (k_pos > q_pos - window)
            s = jnp.where(ok, s, _MASKED)
        return s

    def rendezvous(turn):
        """Both consumers meet here (`turn` is None without ping-pong: nothing to do)."""
        if turn is not None:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def consumer(c, out_refs, q_ref, work, head0, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem, bars):
        """Consumer warpgroup c: the tile's tokens in its window [load_from + c n, + n), for the
        CTA's KV heads head0 .. head0 + hpc - 1 in turn."""
        q_bar, k_bar, v_bar, k_free, v_free, turn = bars
        tile_token, tile_count, tile_pos, kv_start, kv_end, mask_from, load_from, split = work
        q_smem, o_smem = q_smem.at[c], o_smem.at[c]
        if p_smem is not None:
            p_smem = p_smem.at[c]
        if lse_smem is not None:
            lse_smem = lse_smem.at[c]
        if kt_smem is not None:
            kt_smem = kt_smem.at[c]
        window = pl.multiple_of(load_from + c * n, 8)
        token = jnp.maximum(tile_token, window)
        count = jnp.maximum(jnp.minimum(tile_token + tile_count, window + n) - token, 0)
        pos = tile_pos + (token - tile_token)
        shift = token - window  # rows [shift, shift + count) of each head group are ours
        num_blocks = kv_end - kv_start  # per head; the ring position of head i's block b is i * num_blocks + b
        if turn is not None:
            plgpu.set_max_registers(232, action="increase")

        # NOTE: ping-pong. Consumer 1 starts one meeting behind consumer 0 and consumer 0 ends
        # with one more, so in every block one consumer's softmax runs between the other's
        # QK^T issue and its PV issue: the tensor cores see QK0(c0) QK0(c1) PV0(c0) QK1(c0)
        # PV0(c1) QK1(c1) ... Both meet twice per KV block, also when one has no tokens here.
        if c == 1:
            rendezvous(turn)

        def load_q(i):
            """Head head0 + i's queries into Q buffer i % q_buffers."""
            buf = lax.rem(i, q_buffers)

            @pl.loop(0, group)
            def _load_q(g):
                rows_g = pl.multiple_of(g * n, 8)
                plgpu.copy_gmem_to_smem(
                    q_ref.at[pl.ds(window, n), (head0 + i) * group + g],
                    q_smem.at[buf, pl.ds(rows_g, n)],
                    q_bar.at[c * q_buffers + buf],
                )

        @pl.when(count > 0)
        def _attend():
            load_q(0)

            @pl.loop(0, hpc)
            def _head(i):
                head = head0 + i
                buf = lax.rem(i, q_buffers)
                plgpu.barrier_wait(q_bar.at[c * q_buffers + buf])
                if hpc > 1:
                    # The other buffer held head i - 1's queries, whose wgmmas are done.
                    pl.when(i + 1 < hpc)(lambda: load_q(i + 1))
                q_i = q_smem.at[buf]
                ring = i * num_blocks - kv_start
                pos_first = pos - shift  # position of row 0 of each head group

                def step(kv_block, carry, masked: bool):
                    acc, m_i, l_i = carry
                    slot = lax.rem(ring + kv_block, slots)
                    plgpu.barrier_wait(k_bar.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_i, _k_transposed(k_smem.at[slot], kt_smem))
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
                    acc = _add_pv(acc, p, v_smem.at[slot], p_smem)
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                carry = (
                    jnp.zeros((rows, head_dim), jnp.float32),
                    jnp.full((rows,), _MASKED, jnp.float32),
                    jnp.zeros((rows,), jnp.float32),
                )
                carry = lax.fori_loop(kv_start, mask_from, functools.partial(step, masked=False), carry)
                acc, m_i, l_i = lax.fori_loop(mask_from, kv_end, functools.partial(step, masked=True), carry)
                seen = m_i > 0.5 * _MASKED  # rows that saw at least one key
                inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
                if hpc > 1:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # head i - 1's stores read o/lse
                o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
                stores = [(o_smem, out_refs[0])]
                if splits > 1:
                    # log2-sum-exp2 of the row's scores in this split; rows that saw no key weigh 0.
                    lse = jnp.where(seen, m_i + jnp.log2(jnp.where(seen, l_i, 1.0)), _MASKED)
                    lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
                    stores.append((lse_smem, out_refs[1]))
                plgpu.commit_smem()

                @pl.loop(0, group)
                def _store(g):
                    for smem, gmem in stores:
                        if splits > 1:
                            gmem = gmem.at[split]
                        done = jnp.int32(0)
                        size = n
                        while size:
                            # TMA boxes have static sizes: store `count` rows as a sum of powers of two.
                            @pl.when((count & size) != 0)
                            def _store_rows(smem=smem, gmem=gmem, done=done, size=size):
                                plgpu.copy_smem_to_gmem(
                                    smem.at[pl.ds(g * n + shift + done, size)],
                                    gmem.at[pl.ds(token + done, size), head * group + g],
                                )

                            done = done + (count & size)
                            size //= 2

            plgpu.wait_smem_to_gmem(0)

        # A warpgroup with no tokens in this tile (a decode next to a prefill) only passes the
        # K/V blocks on: the producer waits for every consumer's release.
        @pl.when(count == 0)
        def _release_only():
            @pl.loop(0, hpc * num_blocks)
            def _release(b):
                slot = lax.rem(b, slots)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                rendezvous(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                rendezvous(turn)

        if c == 0:
            rendezvous(turn)

    def _add_pv(acc, p, v_slot, p_smem):
        """acc + P V: P from registers on the GPU; through SMEM in the simulator (p_smem)."""
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

        return acc + pl.run_scoped(pv_staged, plgpu.ACC((rows, head_dim), jnp.float32))

    def producer(kv_ref, page_indices_ref, seq, work, head0, k_smem, v_smem, bars):
        """Streams the tile's KV blocks for each of the CTA's heads in turn through the ring."""
        _, k_bar, v_bar, k_free, v_free, turn = bars
        if turn is not None:
            plgpu.set_max_registers(40, action="decrease")
        _, _, _, kv_start, kv_end, _, _, _ = work
        num_blocks = kv_end - kv_start
        total = hpc * num_blocks

        @pl.loop(0, total)
        def _fetch(b):
            i = lax.div(b, num_blocks)  # the CTA's i-th head
            kv_block = kv_start + b - i * num_blocks
            slot = lax.rem(b, slots)
            for kv, smem, bar, free in ((0, k_smem, k_bar, k_free), (1, v_smem, v_bar, v_free)):

                @pl.when(b >= slots)
                def _wait_free(free=free):
                    plgpu.barrier_wait(free.at[slot])

                @pl.loop(0, ppb)
                def _fetch_page(j, kv=kv, smem=smem, bar=bar):
                    entry = jnp.minimum(kv_block * ppb + j, pages_per_seq - 1)
                    page = jnp.clip(page_indices_ref[seq, entry], 0, num_pages - 1)
                    rows_j = pl.multiple_of(j * page_size, page_size)
                    plgpu.copy_gmem_to_smem(
                        kv_ref.at[kv, head0 + i, page], smem.at[slot, pl.ds(rows_j, page_size)], bar.at[slot]
                    )

        # Observe the consumer's releases of the last slots too, so every barrier phase has a
        # waiter (the simulator checks this; on the GPU it only delays the idle producer's exit).
        @pl.loop(jnp.maximum(total - slots, 0), total)
        def _drain(b):
            slot = lax.rem(b, slots)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

    def body(work_ref, page_indices_ref, q_ref, kv_ref, *refs):
        out_refs = refs[: len(out_type)]
        q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem, bars = refs[len(out_type) :]
        tile = lax.axis_index("tile")
        head0 = lax.axis_index("head") * hpc
        wg = lax.axis_index("wg")
        seq = work_ref[tile, _W_SEQ]
        columns = (_W_TOKEN, _W_COUNT, _W_POS, _W_KV_START, _W_KV_END, _W_MASK_FROM, _W_LOAD_FROM)
        work = tuple(work_ref[tile, c] for c in columns)
        work += (work_ref[tile, _W_SPLIT] if splits > 1 else 0,)
        count = work[1]

        for c in range(consumers):

            @pl.when((count > 0) & (wg == c))
            def _consume(c=c):
                smem = (q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, kt_smem)
                consumer(c, out_refs, q_ref, work, head0, *smem, bars)

        @pl.when((count > 0) & (wg == consumers))
        def _produce():
            producer(kv_ref, page_indices_ref, seq, work, head0, k_smem, v_smem, bars)

    splits = plan.kv_splits
    out_type = [jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype)]
    # Per split: normalised O and the rows' log2-sum-exp2, _LSE_WIDTH wide.
    # NOTE: a TMA box's SMEM rows must start 128-byte aligned; 8-wide fp32 rows (32 bytes) gave
    # CUDA_ERROR_MISALIGNED_ADDRESS on the H200.
    if splits > 1:
        out_type = [
            jax.ShapeDtypeStruct((splits, num_tokens, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_tokens, num_q_heads, _LSE_WIDTH), jnp.float32),
        ]
    consumers = plan.consumers
    scratch = [
        _swizzled((consumers, q_buffers, rows, head_dim), dtype),  # q (the next head's loads ahead)
        _swizzled((slots, block_kv, head_dim), dtype),  # k ring
        _swizzled((slots, block_kv, head_dim), dtype),  # v ring
        _swizzled((consumers, rows, block_kv), dtype) if simulate else None,  # p (registers on the GPU)
        plgpu.SMEM((consumers, rows, head_dim), out_type[0].dtype),  # o staging (untiled: row-granular TMA stores)
        plgpu.SMEM((consumers, rows, _LSE_WIDTH), jnp.float32) if splits > 1 else None,
        plgpu.SMEM((consumers, head_dim, block_kv), dtype) if simulate else None,
        (
            plgpu.Barrier(num_arrivals=group, num_barriers=consumers * q_buffers),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=slots),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=slots),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
            plgpu.Barrier(num_arrivals=2) if plan.pingpong else None,  # the consumers' turns
        ),
    ]
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_work, num_kv_heads // hpc),
        grid_names=("tile", "head"),
        num_threads=consumers + 1,
        thread_name="wg",
        # approx_math: ex2.approx for the softmax (and tanh.approx for the soft-cap), as FA3 does.
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True
        ),
        interpret=interpret,
    )


def ragged_paged_attention_mosaic(
    q: jax.Array,  # [T, Hq, D]
    kv_pages: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S]
    page_indices: jax.Array,  # [S, P]
    cu_q_lens: jax.Array,  # [S + 1]
    num_seqs: jax.Array,  # [1]
    params: AttentionParams,
    *,
    interpret=None,
) -> jax.Array:  # [T, Hq, D]
    """Ragged paged attention on Hopper; same contract as `ragged_paged_attention_reference`.

    `interpret`: None/False compiles for the GPU; True or an `InterpretGPUParams` runs the
    Mosaic GPU simulator on CPU (tests).
    """
    return _ragged_paged_attention(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, params, plan=None, interpret=interpret
    )


def _ragged_paged_attention(
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, params: AttentionParams, *, plan: _Plan | None, interpret
) -> jax.Array:
    """`ragged_paged_attention_mosaic` with an explicit launch plan (bench/kernels.py tunes it)."""
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_pages.shape
    reason = mosaic_unsupported_reason(
        dtype=q.dtype, head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, page_size=page_size
    )
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU ragged paged attention: {reason}")
    if kv_pages.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and kv_pages ({kv_pages.dtype}) must share a dtype")
    simulate = interpret is not None and interpret is not False
    if interpret is True:
        interpret = _simulator_params()
    group = num_q_heads // num_kv_heads
    plan = plan or _plan(
        num_tokens=num_tokens,
        num_slots=kv_lens.shape[0],
        num_kv_heads=num_kv_heads,
        max_kv_len=page_indices.shape[1] * page_size,
        group=group,
        page_size=page_size,
        head_dim=head_dim,
    )
    if (plan.pages_per_block * page_size) % 64:
        raise ValueError(f"KV blocks must be a multiple of 64 tokens (wgmma tiling), got {plan}")
    if num_kv_heads % plan.heads_per_cta:
        raise ValueError(f"{num_kv_heads} KV heads are not a multiple of heads_per_cta in {plan}")
    if plan.pingpong and plan.consumers != 2:
        raise ValueError(f"ping-pong needs two consumer warpgroups, got {plan}")
    padded_tokens = max(-(-num_tokens // 8) * 8, plan.tile_tokens)
    q_in = q if padded_tokens == num_tokens else jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    block_kv = plan.pages_per_block * page_size
    work = _work_list(
        cu_q_lens,
        kv_lens,
        num_seqs,
        num_tokens=padded_tokens,
        tokens_per_tile=plan.tile_tokens,
        block_kv=block_kv,
        sliding_window=params.sliding_window,
        kv_splits=plan.kv_splits,
    )
    kernel = _build_kernel(
        num_tokens=padded_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        num_pages=num_pages,
        pages_per_seq=page_indices.shape[1],
        num_work=work.shape[0],
        dtype=q.dtype,
        plan=plan,
        params=params,
        simulate=simulate,
        interpret=interpret,
    )
    outs = kernel(work, page_indices, q_in, kv_pages)
    if plan.kv_splits == 1:
        return outs[0][:num_tokens]
    return _merge_splits(*outs)[:num_tokens].astype(q.dtype)


def _merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """o_parts [K, T, Hq, D], lse_parts [K, T, Hq, _LSE_WIDTH] (log2 domain) -> [T, Hq, D] fp32.

    A split that saw no key has lse = _MASKED and o = 0: it weighs nothing next to one that
    did, and a token no split served (padding) comes out 0, not 0/0.
    """
    lse = lse_parts[..., 0]  # [K, T, Hq]
    weight = jnp.exp2(lse - lse.max(axis=0))  # [K, T, Hq]
    # NOTE: a product and a sum, not einsum: a GPU f32 dot may round through TF32.
    return (weight[..., None] * o_parts).sum(axis=0) / weight.sum(axis=0)[..., None]


def _simulator_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
