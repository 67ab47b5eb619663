"""Ragged paged attention on the GPU: correctness on real shapes, and time against the ceilings.

    python bench/kernels.py            # the table: Llama-3-8B heads (32 q / 8 kv, d=128), bf16, page 16
    python bench/kernels.py --grid     # plus the correctness grid (GQA 1/4/8 x d 64/128 x page 16/32/64)
    python bench/kernels.py --shapes gqa16 --grid  # GLM-4-9B's heads (32 q / 2 kv: GQA 16) instead,
                                                   # and the grid at GQA 16 (--shapes all: every set)
    python bench/kernels.py --shapes gptoss --grid  # gpt-oss-20b's (64 q / 8 kv, d=64, sinks), window
                                                    # 128 and full; the grid at GQA 8 with sinks
    python bench/kernels.py --tune     # plus every launch plan of the kernel on a few shapes (logged)
    python bench/kernels.py --load-time  # only: how long a compiled step takes to load in a new process

In one run it measures the device's copy bandwidth and dense bf16 matmul rate, then times the
Mosaic GPU kernel, the XLA path, jax's Triton `paged_attention` (decode) and cuDNN through
`jax.nn.dot_product_attention` (dense prefill, no paging). Times are device time from CUPTI
(sum of the kernels one call launches, median of the iterations); wall-clock per call is logged
beside it. Writes the table as markdown and a full log to $OUT (or the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench import workload
from pallas_kernels.ragged_paged_attention.common import AttentionParams
from pallas_kernels.ragged_paged_attention.mosaic_gpu import LaunchPlan, default_plan, ragged_paged_attention_mosaic
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla

HQ, HKV, D, PAGE = 32, 8, 128, 16
GLM_HQ, GLM_HKV = 32, 2  # GLM-4-9B: GQA 16, d=128
GLM_PREFIX = "glm-4-9b "
GPTOSS_HQ, GPTOSS_HKV, GPTOSS_D, GPTOSS_WINDOW = 64, 8, 64, 128  # gpt-oss-20b; sinks on every layer
GPTOSS_PREFIX = "gpt-oss-20b "
DTYPE = jnp.bfloat16
LOG: list[str] = []


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# Timing


def device_time_us(fn, *args, iterations: int = 20) -> tuple[float, float]:
    """(median device time from CUPTI, wall-clock per call), both in microseconds."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iterations):
        out = fn(*args)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - start) / iterations * 1e6
    del out
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, per_iter = profiler.measure(fn, iterations=iterations)(*args)
        device = statistics.median(per_iter) * 1e3 if isinstance(per_iter, list) else per_iter * 1e3
    except Exception as e:  # noqa: BLE001 - CUPTI missing: fall back to wall clock
        log(f"  (CUPTI unavailable: {e!r}; using wall clock)")
        device = wall
    return device, wall


def kernel_breakdown(fn, *args) -> list[tuple[str, float]]:
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, per_kernel = profiler.measure(fn, aggregate=False)(*args)
        return [(name[:60], ms * 1e3) for name, ms in per_kernel or []]
    except Exception:  # noqa: BLE001
        return []


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, dense bf16 matmul FLOP/s)."""
    n = 1 << 29  # 1 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(DTYPE)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    t_copy, _ = device_time_us(copy, x, iterations=10)
    del x
    size = 8192
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(DTYPE)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32).astype(DTYPE)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm, _ = device_time_us(mm, a, b, iterations=10)
    bandwidth = 2 * n * 2 / (t_copy * 1e-6)
    rate = 2 * size**3 / (t_mm * 1e-6)
    log(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s (read + write), bf16 matmul 8192^3 {rate / 1e12:.0f} TFLOP/s")
    return bandwidth, rate


# ----------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass
class Shape:
    name: str
    q_lens: list[int]
    kv_lens: list[int]
    kind: str  # "decode" | "prefill" | "mixed"
    hq: int = HQ  # query heads
    hkv: int = HKV  # KV heads
    head_dim: int = D
    window: int | None = None  # sliding window
    sinks: bool = False  # a learned sink per query head (random here)

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def params(self) -> AttentionParams:
        return AttentionParams(sm_scale=1.0 / math.sqrt(self.head_dim), sliding_window=self.window)


def table_shapes(which: str = "llama") -> list[Shape]:
    """The shapes of `which` ("llama", "gqa16", "gptoss" or "all"), the ones with a bar first, so
    a run cut short still has them."""
    shapes = llama_shapes() if which in ("llama", "all") else []
    if which in ("gqa16", "all"):
        shapes += glm_shapes()
    if which in ("gptoss", "all"):
        shapes += gptoss_shapes()
    return shapes


def gptoss_shapes() -> list[Shape]:
    """gpt-oss-20b's attention (64 q / 8 kv: GQA 8, d=64, sinks) on the main shapes, in its
    sliding-window layers (128 tokens) and its full ones."""
    return [
        dataclasses.replace(
            shape,
            name=GPTOSS_PREFIX + shape.name + (f" window {window}" if window else " full"),
            hq=GPTOSS_HQ,
            hkv=GPTOSS_HKV,
            head_dim=GPTOSS_D,
            window=window,
            sinks=True,
        )
        for window in (GPTOSS_WINDOW, None)
        for shape in (
            Shape("decode 128 x 2048", [1] * 128, [2048] * 128, "decode"),
            sharegpt_decode_shape(),
            Shape("prefill 8 x 2048 fresh", [2048] * 8, [2048] * 8, "prefill"),
            Shape("mixed 128 x 2048 + 1024 chunk", [1] * 128 + [1024], [2048] * 128 + [2048], "mixed"),
            Shape("decode 4 x 8192", [1] * 4, [8192] * 4, "decode"),
        )
    ]


def glm_shapes() -> list[Shape]:
    """GLM-4-9B's heads (32 q / 2 kv: GQA 16, the kernel's token-major rows) on the main shapes."""
    return [
        dataclasses.replace(shape, name=GLM_PREFIX + shape.name, hq=GLM_HQ, hkv=GLM_HKV)
        for shape in (
            Shape("decode 128 x 2048", [1] * 128, [2048] * 128, "decode"),
            sharegpt_decode_shape(),
            Shape("prefill 8 x 2048 fresh", [2048] * 8, [2048] * 8, "prefill"),
            Shape("mixed 128 x 2048 + 1024 chunk", [1] * 128 + [1024], [2048] * 128 + [2048], "mixed"),
            Shape("decode 4 x 8192 (split-K)", [1] * 4, [8192] * 4, "decode"),
        )
    ]


def llama_shapes() -> list[Shape]:
    shapes = [
        Shape("decode 128 x 2048", [1] * 128, [2048] * 128, "decode"),
        Shape("prefill 8 x 2048 fresh", [2048] * 8, [2048] * 8, "prefill"),
        Shape("prefill 2048 onto 6144", [2048], [8192], "prefill"),
        Shape("mixed 128 x 2048 + 1024 chunk", [1] * 128 + [1024], [2048] * 128 + [2048], "mixed"),
        sharegpt_decode_shape(),
    ]
    for reqs in (32, 128, 256):
        for ctx in (512, 2048, 8192):
            if (reqs, ctx) != (128, 2048):
                shapes.append(Shape(f"decode {reqs} x {ctx}", [1] * reqs, [ctx] * reqs, "decode"))
    shapes.append(Shape("decode 4 x 8192 (split-K)", [1] * 4, [8192] * 4, "decode"))
    return shapes


def sharegpt_decode_shape(num_requests: int = 1000, seed: int = 0) -> Shape:
    """One decode step of the offline benchmark's mix: each request of `sharegpt_like` at a random
    point of its output (uniform shapes hide what one long request costs a step)."""
    rng = np.random.default_rng(seed)
    kv_lens = [len(ids) + int(rng.integers(0, out)) + 1 for ids, out in workload.sharegpt_like(num_requests)]
    return Shape(f"decode {num_requests} sharegpt-like", [1] * num_requests, kv_lens, "decode")


def build_batch(q_lens, kv_lens, *, hq=HQ, hkv=HKV, d=D, page=None, dtype=DTYPE, seed=0, extra_slots=0,
                extra_tokens=0):
    """Random q and KV pool; every request gets its own scattered pages (page: tokens per page, PAGE
    unless given)."""
    page = page or PAGE
    rng = np.random.default_rng(seed)
    num_slots = len(q_lens) + extra_slots
    pages_per_seq = max(-(-max(kv_lens) // page), 1)
    pages_per_seq = -(-pages_per_seq // 8) * 8  # the Triton kernel wants a multiple of its 8-page blocks
    num_pages = num_slots * pages_per_seq
    page_indices = rng.permutation(num_pages).reshape(num_slots, pages_per_seq).astype(np.int32)
    q_lens_all = list(q_lens) + [0] * extra_slots
    kv_lens_all = list(kv_lens) + [0] * extra_slots
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens_all)]).astype(np.int32)
    num_tokens = int(cu_q_lens[-1]) + extra_tokens
    key = jax.random.key(seed)
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (num_tokens, hq, d), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (2, hkv, num_pages, page, d), jnp.float32).astype(dtype)
    return (
        q,
        kv,
        jnp.asarray(kv_lens_all, jnp.int32),
        jnp.asarray(page_indices),
        jnp.asarray(cu_q_lens),
        jnp.asarray([len(q_lens)], jnp.int32),
    )


def causal_flops(q_lens, kv_lens, hq=HQ, d=D, window=None) -> float:
    total = 0
    for q_len, kv_len in zip(q_lens, kv_lens, strict=True):
        visible = np.arange(kv_len - q_len, kv_len) + 1  # keys each query token sees
        total += int(np.minimum(visible, window or kv_len).sum())
    return 4.0 * hq * d * total


def kv_bytes(kv_lens, hkv=HKV, d=D, itemsize=2, window=None) -> float:
    return float(sum(min(kv, window or kv) for kv in kv_lens)) * hkv * d * 2 * itemsize


def shape_inputs(shape: Shape) -> tuple:
    """The implementations' positional inputs for a shape: its batch, then its sinks if it has them."""
    batch = build_batch(shape.q_lens, shape.kv_lens, hq=shape.hq, hkv=shape.hkv, d=shape.head_dim)
    if not shape.sinks:
        return batch
    return (*batch, jax.random.normal(jax.random.key(6), (shape.hq,), jnp.float32))


def relative_error(out, ref) -> float:
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def poisoned_call(fn, batch):
    """Call fn after freeing a NaN buffer of the output's size, so a reused block shows unwritten rows.

    NOTE: best effort: the allocator usually hands the freed block to the next same-size
    output. The CPU simulator tests poison the output for certain.
    """
    poison = jnp.full(batch[0].shape, jnp.nan, batch[0].dtype)
    poison.block_until_ready()
    del poison
    return jax.block_until_ready(fn(*batch))


# ----------------------------------------------------------------------------------------------
# Implementations


PARAMS = AttentionParams(sm_scale=1.0 / math.sqrt(D))


def mosaic_fn(params=PARAMS, plan=None):
    """The kernel on (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs[, sinks])."""
    return jax.jit(lambda *b: ragged_paged_attention_mosaic(*b[:6], params, sinks=_sinks(b), plan=plan))


def xla_fn(params=PARAMS):
    return jax.jit(lambda *b: ragged_paged_attention_xla(*b[:6], params, sinks=_sinks(b)))


def _sinks(inputs: tuple):
    return inputs[6] if len(inputs) > 6 else None


def triton_decode_fn():
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    def run(q, k_pages, v_pages, block_tables, lengths):
        return paged_attention(
            q * jnp.asarray(PARAMS.sm_scale, q.dtype),
            k_pages,
            v_pages,
            block_tables,
            lengths,
            pages_per_compute_block=8,
            k_splits=1,
        )

    return jax.jit(run)


def cudnn_prefill_fn():
    def run(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=PARAMS.sm_scale, is_causal=True, implementation="cudnn")

    return jax.jit(run)


def plans_for(shape: Shape) -> list[LaunchPlan]:
    tokens = default_plan(
        num_tokens=1, num_slots=1, num_kv_heads=shape.hkv, max_kv_len=PAGE, group=shape.group, page_size=PAGE,
        head_dim=shape.head_dim,
    ).tokens_per_tile
    plan = LaunchPlan
    if shape.kind == "decode":
        plans = [plan(tokens, 4, 3), plan(tokens, 8, 2), plan(tokens, 8, 3), plan(tokens, 8, 2, max_ctas=264)]
        plans += [plan(tokens, 4, 3, kv_splits=splits) for splits in (2, 4)]
        return plans
    return [
        plan(tokens, 4, 3),
        plan(tokens, 4, 3, consumers=2, persistent=False),  # the plan before ping-pong (64-key blocks)
        plan(tokens, 4, 3, consumers=2, pingpong=True, persistent=False),
        plan(tokens, 8, 2, consumers=2, persistent=False),
        plan(tokens, 8, 2, consumers=2, pingpong=True, persistent=False),  # the default
        plan(tokens, 8, 2, consumers=2, pingpong=True),  # persistent
    ]


# ----------------------------------------------------------------------------------------------
# One table row


def bench_shape(shape: Shape, bandwidth: float, rate: float) -> dict:
    log(f"== {shape.name}")
    batch = shape_inputs(shape)
    row: dict = {"shape": shape.name, "kind": shape.kind}
    iters = 20 if shape.kind == "decode" else 10

    xla = xla_fn(shape.params)
    ref = jax.block_until_ready(xla(*batch))
    kernel = mosaic_fn(shape.params)
    try:
        out = poisoned_call(kernel, batch)
        row["rel_err_vs_xla"] = relative_error(out, ref)
        row["finite"] = bool(jnp.isfinite(out.astype(jnp.float32)).all())
        del out
        row["mosaic_us"], row["mosaic_wall_us"] = device_time_us(kernel, *batch, iterations=iters)
        row["mosaic_kernels"] = kernel_breakdown(kernel, *batch)
    except Exception as e:  # noqa: BLE001 - report and go on with the other columns
        row["mosaic_error"] = repr(e)[:400]
        log(traceback.format_exc())
    row["xla_us"], _ = device_time_us(xla, *batch, iterations=3 if shape.kind != "decode" else 10)

    q, kv, kv_lens, page_indices = batch[:4]
    plain = not shape.sinks and shape.window is None and shape.head_dim == D  # what Triton and cuDNN compute
    kv_read = kv_bytes(shape.kv_lens, hkv=shape.hkv, d=shape.head_dim, window=shape.window)
    flops = causal_flops(shape.q_lens, shape.kv_lens, hq=shape.hq, d=shape.head_dim, window=shape.window)
    if shape.kind == "decode":
        try:
            if plain:
                triton = triton_decode_fn()
                targs = (q, kv[0], kv[1], page_indices, kv_lens)
                ref_scaled = jax.block_until_ready(triton(*targs))
                row["triton_rel_err_vs_xla"] = relative_error(ref_scaled, ref)
                row["triton_us"], _ = device_time_us(triton, *targs, iterations=iters)
        except Exception as e:  # noqa: BLE001
            row["triton_error"] = repr(e)[:300]
            log(traceback.format_exc())
        row["floor_us"] = kv_read / bandwidth * 1e6
        row["metric"] = "KV bytes / copy BW"
    elif shape.kind == "prefill":
        row["floor_us"] = flops / rate * 1e6
        row["metric"] = "causal FLOP/s / matmul"
        if "prefill 8 x 2048" in shape.name and plain:
            try:
                b, t = len(shape.q_lens), shape.q_lens[0]
                qd = q.reshape(b, t, shape.hq, D)
                kd = jax.random.normal(jax.random.key(3), (b, t, shape.hkv, D), jnp.float32).astype(DTYPE)
                vd = jax.random.normal(jax.random.key(4), (b, t, shape.hkv, D), jnp.float32).astype(DTYPE)
                row["cudnn_us"], _ = device_time_us(cudnn_prefill_fn(), qd, kd, vd, iterations=iters)
            except Exception as e:  # noqa: BLE001
                row["cudnn_error"] = repr(e)[:300]
                log(traceback.format_exc())
    else:
        row["floor_us"] = max(kv_read / bandwidth, flops / rate) * 1e6
        row["metric"] = "max(bytes, FLOPs) floor"
    if "mosaic_us" in row:
        row["fraction"] = row["floor_us"] / row["mosaic_us"]
        row["speedup_vs_xla"] = row["xla_us"] / row["mosaic_us"]
    log(json.dumps({k: v for k, v in row.items() if k != "mosaic_kernels"}))
    for name, us in row.get("mosaic_kernels", []):
        log(f"    {us:9.1f} us  {name}")
    del batch, ref, q, kv
    return row


def markdown(rows: list[dict], bandwidth: float, rate: float) -> str:
    head = (
        f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; page {PAGE}; ceilings measured in the same "
        f"run: copy {bandwidth / 1e12:.2f} TB/s (read + write), dense bf16 matmul {rate / 1e12:.0f} TFLOP/s.\n\n"
        "| shape | Mosaic us | vs ceiling | XLA path us | speedup vs XLA | Triton paged us | cuDNN dense us "
        "| rel err vs XLA |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:

        def cell(key, fmt="{:.1f}", r=r):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else ("fail" if f"{key[:-3]}_error" in r else "")

        frac = f"{r['fraction']:.2f} ({r['metric']})" if "fraction" in r else ""
        lines.append(
            f"| {r['shape']} | {cell('mosaic_us')} | {frac} | {cell('xla_us')} | {cell('speedup_vs_xla', '{:.1f}x')} "
            f"| {cell('triton_us')} | {cell('cudnn_us')} | {cell('rel_err_vs_xla', '{:.1e}')} |"
        )
    return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Correctness grid


def grid_cases(groups: tuple[int, ...]):
    for group in groups:
        for head_dim in (64, 128):
            for page in (16, 32, 64):
                yield group, head_dim, page


def run_grid(groups: tuple[int, ...], deadline: float = math.inf, with_sinks: bool = False) -> list[str]:
    """The kernel against the reference on random ragged batches per (GQA group, head_dim, page
    size), every third with a sliding window, every other with a soft-cap; `with_sinks`: all with
    random sinks."""
    failures = []
    rng = np.random.default_rng(7)
    for i, (group, head_dim, page) in enumerate(grid_cases(groups)):
        if time.time() > deadline:
            log("grid: out of time budget, stopping")
            failures.append("(grid not finished)")
            break
        hkv = 2
        q_lens = [1] * 6 + [int(rng.integers(2, 300)), int(rng.integers(2, 300))]
        kv_lens = [int(rng.integers(1, 1500)) for _ in range(6)] + [q_lens[6], q_lens[7] + int(rng.integers(0, 900))]
        batch = build_batch(
            q_lens, kv_lens, hq=hkv * group, hkv=hkv, d=head_dim, page=page, seed=i, extra_slots=2, extra_tokens=5
        )
        if with_sinks:
            batch = (*batch, jax.random.normal(jax.random.key(i), (hkv * group,), jnp.float32))
        params = AttentionParams(
            sm_scale=1.0 / math.sqrt(head_dim),
            sliding_window=None if i % 3 else 256,
            soft_cap=None if i % 2 else 30.0,
        )
        name = f"G{group} d{head_dim} page{page} window={params.sliding_window} cap={params.soft_cap}"
        name += " sinks" if with_sinks else ""
        try:
            ref = jax.jit(lambda *b, p=params: ragged_paged_attention_reference(*b[:6], p, sinks=_sinks(b)))(*batch)
            out = poisoned_call(mosaic_fn(params), batch)
            err = relative_error(out, ref)
            live = int(batch[4][len(q_lens)])
            pad_ok = not bool(jnp.any(out[live:]))
            ok = err < 1e-2 and pad_ok and bool(jnp.isfinite(out.astype(jnp.float32)).all())
            log(f"grid {name}: rel err {err:.2e} padded-zero {pad_ok} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(name)
        except Exception as e:  # noqa: BLE001
            log(f"grid {name}: ERROR {e!r:.400}")
            failures.append(name)
    return failures


def engine_batch(rng, num_tokens: int, num_slots: int, pages_per_seq: int, kv: jax.Array, kind: str):
    """A batch as the engine pads it: live requests first (prefill chunks, then decodes), empty
    slots after them, padded tokens past the last request, page ids anywhere in the pool."""
    max_kv = pages_per_seq * PAGE
    q_lens: list[int] = []
    budget = num_tokens
    if kind in ("prefill", "mixed"):
        while budget > 1 and len(q_lens) < num_slots // 2 + 1:
            q = int(min(budget, rng.integers(2, min(2048, max_kv) + 1)))
            q_lens.append(q)
            budget -= q
            if rng.random() < (0.3 if kind == "mixed" else 0.05):
                break
    if kind in ("decode", "mixed"):
        room = num_slots - len(q_lens)
        if room > 0 and budget > 0:
            q_lens += [1] * int(min(budget, room, rng.integers(1, room + 1)))
    q_lens = q_lens[:num_slots] or [1]
    kv_lens = [int(rng.integers(q, max_kv + 1)) for q in q_lens]
    live = len(q_lens)
    num_pages = kv.shape[2]
    page_indices = np.zeros((num_slots, pages_per_seq), np.int32)
    page_indices[:live] = rng.integers(0, num_pages, (live, pages_per_seq))
    cu = np.zeros(num_slots + 1, np.int32)
    cu[1 : live + 1] = np.cumsum(q_lens)
    cu[live + 1 :] = cu[live]
    kv_lens_all = np.zeros(num_slots, np.int32)
    kv_lens_all[:live] = kv_lens
    q = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (num_tokens, HQ, D), jnp.float32).astype(DTYPE)
    desc = f"T={num_tokens} S={num_slots} P={pages_per_seq} {kind} live={live} tokens={cu[live]} max_kv={max(kv_lens)}"
    return desc, (q, kv, jnp.asarray(kv_lens_all), jnp.asarray(page_indices), jnp.asarray(cu),
                  jnp.asarray([live], jnp.int32))


def run_fuzz(cases: int, num_pages: int, deadline: float) -> list[str]:
    """Engine-shaped batches (every token bucket, slot count and page width of the 8B engine),
    each checked against the XLA path; the case is logged before it runs (a fault names it)."""
    rng = np.random.default_rng(11)
    kv = jax.random.normal(jax.random.key(5), (2, HKV, num_pages, PAGE, D), jnp.float32).astype(DTYPE)
    failures = []
    buckets = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    for i in range(cases):
        if time.time() > deadline:
            log("fuzz: out of time budget")
            break
        t = buckets[i % len(buckets)]
        kind = ("decode", "mixed", "prefill")[(i // len(buckets)) % 3]
        desc, batch = engine_batch(rng, t, min(t, 1024), (64, 256)[i % 2], kv, kind)
        log(f"fuzz {i}: {desc} ...")
        out = jax.block_until_ready(mosaic_fn()(*batch))
        ref = xla_fn()(*batch)
        err = relative_error(out, ref)
        ok = err < 1e-2 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
        log(f"fuzz {i}: rel err {err:.1e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(desc)
    return failures


# --shapes -> the grid's GQA groups (gptoss: with sinks)
GRID_GROUPS = {"llama": (1, 4, 8), "gqa16": (16,), "gptoss": (8,), "all": (1, 4, 8, 16)}
TUNE_SHAPES = (
    "decode 1000 sharegpt-like",
    "decode 32 x 512",
    "decode 128 x 512",
    "decode 256 x 512",
    "decode 128 x 2048",
    "decode 4 x",
    "prefill 8 x 2048",
    "mixed",
)


def write_outputs(out_dir: str, rows: list[dict], failures: list[str], bandwidth: float, rate: float) -> str:
    table = markdown(rows, bandwidth, rate)
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "kernels.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump({"rows": rows, "grid_failures": failures, "bandwidth": bandwidth, "rate": rate}, f, default=str)
    return table


def tune_shape(shape: Shape, deadline: float) -> dict:
    """Device time of every launch plan on one shape (logged; the table uses the default plan)."""
    batch = shape_inputs(shape)
    times: dict = {}
    for plan in plans_for(shape):
        if time.time() > deadline:
            break
        try:
            times[str(plan)], _ = device_time_us(mosaic_fn(shape.params, plan=plan), *batch, iterations=10)
            log(f"  tune {shape.name}: {plan}: {times[str(plan)]:.1f} us")
        except Exception as e:  # noqa: BLE001 - e.g. a plan over the SMEM limit
            times[str(plan)] = repr(e)[:200]
            log(f"  tune {shape.name}: {plan}: FAILED {e!r:.300}")
    del batch
    return times


# ----------------------------------------------------------------------------------------------
# Loading a compiled step (server start-up from the compilation cache)

# XLA option sets to compare. aot_compiled_thunks: XLA serializes the executable with its thunks,
# each custom call's serializable state included (the Mosaic kernel's compiled object file in jax
# 0.11.2), where the default serialization keeps the optimized HLO and emits the thunks again at
# load, instantiating every custom call again: for Mosaic GPU, its whole compile (MLIR passes,
# LLVM, ptxas), as the in-process kernel cache of a new process is empty.
LOAD_OPTIONS: dict[str, dict] = {
    "default": {},
    "aot_compiled_thunks": {"xla_gpu_experimental_aot_compiled_thunks": True},
}


def load_time(impls: list[str]) -> list[dict]:
    """Compile one decode step's attention (16 tokens, 16 slots, 256 pages each: the 8B server's
    first bucket), serialize it as jax's persistent compilation cache does, then load and run it
    in a fresh process (`--load-from`), per implementation and XLA option set. A load that costs
    about what the compile did compiles again."""
    from jax.experimental.serialize_executable import serialize

    batch = build_batch([1] * 16, [4096] * 16)
    rows = []
    for impl in impls:
        for name, options in LOAD_OPTIONS.items():
            row: dict = {"impl": impl, "options": name}
            try:
                fn = mosaic_fn() if impl == "mosaic" else xla_fn()
                t0 = time.perf_counter()
                lowered = fn.lower(*batch)
                row["lower_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                compiled = lowered.compile(compiler_options=options or None)
                row["compile_s"] = time.perf_counter() - t0
                expected = np.asarray(jax.block_until_ready(compiled(*batch)).astype(jnp.float32))
                payload, in_tree, out_tree = serialize(compiled)
                row["serialized_bytes"] = len(payload)
                with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
                    pickle.dump({"payload": payload, "in_tree": in_tree, "out_tree": out_tree,
                                 "batch": [np.asarray(x) for x in batch], "expected": expected}, f)
                child = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-from", f.name],
                                       capture_output=True, text=True, timeout=600)
                os.unlink(f.name)
                lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
                if child.returncode or not lines:
                    row["error"] = (child.stderr or child.stdout)[-600:]
                else:
                    row.update(json.loads(lines[-1]))
            except Exception as e:  # noqa: BLE001 - e.g. an option this XLA does not know
                row["error"] = repr(e)[:400]
            log(json.dumps(row))
            rows.append(row)
    return rows


def load_from(path: str) -> int:
    """The child of `load_time`: deserialize, run twice, compare; one JSON line on stdout."""
    from jax.experimental.serialize_executable import deserialize_and_load

    with open(path, "rb") as f:
        data = pickle.load(f)
    jax.devices()  # the backend's start-up is not the executable's load
    t0 = time.perf_counter()
    executable = deserialize_and_load(data["payload"], data["in_tree"], data["out_tree"])
    load_s = time.perf_counter() - t0
    batch = [jnp.asarray(x) for x in data["batch"]]
    t0 = time.perf_counter()
    out = jax.block_until_ready(executable(*batch))
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(executable(*batch))
    second_call_s = time.perf_counter() - t0
    err = relative_error(out, jnp.asarray(data["expected"]))
    print(json.dumps({"load_s": load_s, "first_call_s": first_call_s, "second_call_s": second_call_s,
                      "rel_err_vs_parent": err}), flush=True)
    return 0


def main() -> int:
    global PAGE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="store_true", help="also run the correctness grid")
    parser.add_argument("--tune", action="store_true", help="also time every launch plan on a few shapes")
    parser.add_argument("--shapes", choices=tuple(GRID_GROUPS), default="llama",
                        help="the table's heads: llama (32 q / 8 kv), gqa16 (GLM-4-9B, 32 q / 2 kv), gptoss "
                             "(gpt-oss-20b, 64 q / 8 kv, d 64, sinks, window 128 and full) or all; also the grid's "
                             "GQA groups (gptoss: GQA 8 with sinks)")
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    parser.add_argument("--fuzz", type=int, default=0, help="engine-shaped batches to check first")
    parser.add_argument("--fuzz-pages", type=int, default=56390, help="KV pool pages for the fuzz cases")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop the grid and tuning after this many seconds")
    parser.add_argument("--page-size", type=int, default=PAGE, help="tokens per KV page in the table's shapes")
    parser.add_argument("--load-time", action="store_true",
                        help="only time loading a compiled decode step in a new process (Mosaic and XLA path)")
    parser.add_argument("--load-impls", default="mosaic,xla", help="implementations for --load-time")
    parser.add_argument("--load-from", help=argparse.SUPPRESS)  # --load-time's child process
    args = parser.parse_args()
    PAGE = args.page_size
    if args.load_from:
        return load_from(args.load_from)
    if args.load_time:
        log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}")
        rows = load_time(args.load_impls.split(","))
        with open(os.path.join(os.environ.get("OUT", "."), "kernels_load_time.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return 1 if any("error" in r for r in rows) else 0
    start = time.time()
    deadline = start + args.budget_s
    out_dir = os.environ.get("OUT", ".")
    log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, page size {PAGE}")
    failures: list[str] = []
    if args.fuzz:
        failures += run_fuzz(args.fuzz, args.fuzz_pages, deadline)
        log(f"fuzz failures: {failures}")
    bandwidth, rate = ceilings()
    rows: list[dict] = []
    shapes = table_shapes(args.shapes)
    shapes = [s for s in shapes if not args.only or any(o in s.name for o in args.only.split(","))]
    for shape in shapes:
        rows.append(bench_shape(shape, bandwidth, rate))
        write_outputs(out_dir, rows, failures, bandwidth, rate)
    table = write_outputs(out_dir, rows, failures, bandwidth, rate)
    print(table, flush=True)
    if args.grid:
        failures += run_grid(GRID_GROUPS[args.shapes], deadline=deadline, with_sinks=args.shapes == "gptoss")
        if args.shapes == "all":
            failures += run_grid(GRID_GROUPS["gptoss"], deadline=deadline, with_sinks=True)
        write_outputs(out_dir, rows, failures, bandwidth, rate)
    if args.tune:
        tuned = {
            s.name: tune_shape(s, deadline)
            for s in shapes
            if any(s.name.removeprefix(GLM_PREFIX).removeprefix(GPTOSS_PREFIX).startswith(t) for t in TUNE_SHAPES)
        }
        for row in rows:
            row["plans"] = tuned.get(row["shape"], {})
    write_outputs(out_dir, rows, failures, bandwidth, rate)
    if failures:
        print("GRID FAILURES:", failures)
    log(f"total {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
