"""The MoE grouped matmul on the GPU: the Mosaic kernel against its floors and jax's two baselines.

    python -m bench.grouped_matmul                       # Qwen3-30B-A3B shapes (H100 or H200)
    python -m bench.grouped_matmul --models qwen3,mixtral,gpt-oss   # Mixtral-8x7B and gpt-oss-20b too
    python -m bench.grouped_matmul --tune --only "64 tok,16384 tok"  # plus other launch plans (logged)
    python -m bench.grouped_matmul --models gpt-oss --mxfp4          # gpt-oss-20b, bf16 vs MXFP4 weights

Per model, one MoE layer's two grouped GEMMs (gate/up with the fused SwiGLU, and down) at decode
(1, 8, 64, 256 tokens) and prefill (4096, 16384 tokens) sizes, tokens routed to top-k experts
uniformly at random (seeded). In the same run it measures the device's copy bandwidth and dense
bf16 matmul rate (bench/kernels.py's `ceilings`), then per shape times:
  - `grouped_matmul_mosaic` (the default plan), checked on 32 sampled rows against a plain
    per-row product (`sampled_reference`);
  - `jax.lax.ragged_dot` (+ the activation and bias in XLA), skipped where its dense masked
    operand [rows, E * K] would not fit in memory;
  - jax's shipped Mosaic GPU `ragged_dot_mgpu` (+ the activation and bias in XLA).
Decode rows are memory-bound: the floor is max(bytes / copy bandwidth, FLOPs / matmul rate), bytes =
the touched experts' weights + lhs + output; bar >= 0.7 of it. Prefill rows are compute-bound:
FLOP/s over the matmul rate, bar >= 0.6. One shape failing logs its error and the table goes on.
Times are CUPTI device time (median over iterations). Writes grouped_matmul.md / .json / .log to
$OUT (or the current directory); `--budget-s` stops starting new shapes after that many seconds.

`--mxfp4` (the models with MXFP4 checkpoints: gpt-oss) times each decode shape and 4096-token prefill
in both ways of serving those weights: dequantized to bf16 at load (the dense kernel) and packed
(`Mxfp4Weights`, dequantized inside the kernel), each packed row beside the bf16 row of its shape.
The packed rows' byte floor counts the packed bytes (codes, scales) of the touched experts; their
baseline is the XLA path on the packed weights (1-token decode only, where it dequantizes only the
touched experts), and jax's dense baselines are not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench import kernel_report
from bench.kernel_report import Log, ceilings_sentence, cell, kernel_only_cell
from bench.kernels import ceilings, device_time_us, kernel_breakdown
from pallas_kernels.grouped_matmul import Activation, grouped_matmul_xla
from pallas_kernels.grouped_matmul.mosaic_gpu import Plan, default_plan, grouped_matmul_mosaic
from pallas_kernels.grouped_matmul.mxfp4 import BLOCK, Mxfp4Weights, dequantize_kernel_layout, padded_features

DTYPE = jnp.bfloat16
DECODE_TOKENS = (1, 8, 64, 256)
PREFILL_TOKENS = (4096, 16384)
MXFP4_PREFILL_TOKENS = (4096,)
DECODE_BAR, PREFILL_BAR = 0.7, 0.6
KERNEL_NAME = "grouped_matmul_kernel"  # the Mosaic kernel's CUDA name (its body function's)


log = Log()


@dataclasses.dataclass(frozen=True)
class MoeModel:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int  # per expert
    activation: Activation
    bias: bool = False
    mxfp4: bool = False  # its checkpoints store the experts in MXFP4


MODELS = {
    "qwen3": MoeModel("Qwen3-30B-A3B", 128, 8, 2048, 768, Activation("swiglu")),
    "mixtral": MoeModel("Mixtral-8x7B", 8, 2, 4096, 14336, Activation("swiglu")),
    # gpt-oss stores gate/up interleaved; the kernel runs on weights permuted to the split
    # layout at load time (`interleaved_to_split`), so the split layout is what is timed.
    "gpt-oss": MoeModel("gpt-oss-20b", 32, 4, 2880, 2880, Activation("swiglu_oai"), bias=True, mxfp4=True),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    model: MoeModel
    gemm: str  # "gate_up" | "down"
    tokens: int
    kind: str  # "decode" | "prefill"
    weights: str = "bf16"  # "bf16" | "mxfp4" (packed, dequantized in the kernel)

    @property
    def k(self) -> int:
        return self.model.hidden if self.gemm == "gate_up" else self.model.intermediate

    @property
    def n(self) -> int:
        return 2 * self.model.intermediate if self.gemm == "gate_up" else self.model.hidden

    @property
    def activation(self) -> Activation | None:
        return self.model.activation if self.gemm == "gate_up" else None

    @property
    def rows(self) -> int:
        return self.tokens * self.model.top_k

    @property
    def packed(self) -> bool:
        return self.weights == "mxfp4"

    @property
    def problem(self) -> str:
        """The problem whatever the weights' format."""
        return f"{self.model.name} {self.kind} {self.tokens} tok {self.gemm} {self.k}->{self.n}"

    @property
    def name(self) -> str:
        return f"{self.problem} {self.weights}"


def shapes_for(model: MoeModel, mxfp4: bool = False) -> list[Shape]:
    """Decode shapes first (the ones the kernel was written for), then prefill. With `mxfp4` (models
    with MXFP4 checkpoints only), each shape in both weight formats, bf16 first."""
    if mxfp4 and not model.mxfp4:
        return []
    formats = ("bf16", "mxfp4") if mxfp4 else ("bf16",)
    gemms = ("gate_up", "down")
    prefill = MXFP4_PREFILL_TOKENS if mxfp4 else PREFILL_TOKENS
    return [Shape(model, gemm, t, kind, weights)
            for kind, tokens in (("decode", DECODE_TOKENS), ("prefill", prefill))
            for t in tokens for gemm in gemms for weights in formats]


def route(tokens: int, num_experts: int, top_k: int, seed: int) -> np.ndarray:
    """[E] i32 group sizes: each token's top_k distinct experts drawn uniformly."""
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=num_experts).astype(np.int32)


def make_inputs(shape: Shape, seed: int = 0):
    group_sizes = route(shape.tokens, shape.model.num_experts, shape.model.top_k, seed)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    experts = shape.model.num_experts
    lhs = jax.random.normal(k1, (shape.rows, shape.k), jnp.float32).astype(DTYPE)
    if shape.packed:
        rhs = random_mxfp4(k2, experts, shape.k, shape.n)
    else:
        rhs = (jax.random.normal(k2, (experts, shape.k, shape.n), jnp.float32) / shape.k**0.5).astype(DTYPE)
    bias = jax.random.normal(k3, (experts, shape.n), jnp.float32).astype(DTYPE) if shape.model.bias else None
    return lhs, rhs, jnp.asarray(group_sizes), bias


def random_mxfp4(key, experts: int, k: int, n: int) -> Mxfp4Weights:
    """Random codes with scales 2^-8..2^-7: values of RMS ~1/sqrt(K) at K ~ 3000, like the bf16 rows'."""
    k1, k2 = jax.random.split(key)
    blocks = jax.random.bits(k1, (experts, padded_features(k) // 2, n), jnp.uint8)
    scales = jax.random.randint(k2, (experts, k // BLOCK, n), 119, 121).astype(jnp.uint8)
    return Mxfp4Weights(blocks, scales)


# ----------------------------------------------------------------------------------------------
# Implementations: each (lhs, rhs, group_sizes, bias) -> out, jitted


def xla_fn(activation):
    def run(lhs, rhs, gs, bias):
        return grouped_matmul_xla(lhs, rhs, gs, bias=bias, activation=activation)

    return jax.jit(run)


def mosaic_fn(activation, plan: Plan | None = None):
    def run(lhs, rhs, gs, bias):
        return grouped_matmul_mosaic(lhs, rhs, gs, bias=bias, activation=activation, plan=plan)

    return jax.jit(run)


def alternative_plans(shape: Shape) -> list[Plan]:
    """Other launch plans worth timing for this shape (`--tune`): tile sizes and pipeline depths
    around the default, those that tile the shape and fit the 227 KiB of SMEM."""
    out_cols = shape.n // 2 if shape.activation is not None else shape.n
    weight_blocks = 1 if shape.activation is None else 2
    if shape.kind == "decode":
        candidates = [Plan(64, 64, 64, 6), Plan(64, 64, 128, 3), Plan(64, 128, 64, 4)]
    else:
        candidates = [Plan(128, 128, 64, 4), Plan(128, 64, 64, 4), Plan(64, 128, 64, 4), Plan(128, 128, 64, 2)]
    default = default_plan(m=shape.rows, k=shape.k, n=shape.n, num_groups=shape.model.num_experts,
                           activation=shape.activation, packed=shape.packed)
    return [
        p for p in candidates
        if p != default and out_cols % p.block_n == 0 and shape.k % p.block_k == 0
        and p.smem_bytes(2, weight_blocks, shape.packed) <= 227 * 1024
        and not (shape.packed and p.block_k != 64)
        and p.block_m * p.block_n * weight_blocks <= 128 * 128  # fp32 accumulators: <= 128 registers a thread
    ]


@functools.partial(jax.jit, static_argnames="activation")
def _row_product(lhs_row, rhs, group, bias, activation):
    """act(lhs_row @ rhs[group] + bias[group]) in fp32: [K] -> [N] or [N / 2]; MXFP4 rhs dequantized."""
    if isinstance(rhs, Mxfp4Weights):
        weights = dequantize_kernel_layout(rhs.blocks[group], rhs.scales[group], jnp.float32)  # [K, N]
    else:
        weights = rhs[group]
    y = jnp.dot(lhs_row, weights, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias[group].astype(jnp.float32)
    return y if activation is None else activation(y)


def sampled_reference(lhs, rhs, group_sizes: np.ndarray, bias, activation, num_rows: int = 32):
    """(rows, their reference outputs [rows, N or N / 2]) for the first, the last and random real
    rows, one plain product each (a full reference would take longer than the kernels' timing)."""
    total = int(group_sizes.sum())
    rng = np.random.default_rng(1)
    rows = np.unique(np.concatenate([[0, total - 1], rng.integers(0, total, num_rows - 2)]))
    groups = np.searchsorted(np.cumsum(group_sizes), rows, side="right")
    outs = [_row_product(lhs[r], rhs, jnp.int32(g), bias, activation) for r, g in zip(rows, groups, strict=True)]
    return rows, jnp.stack(outs)


def epilogue_in_xla(y, group_sizes, bias, activation, dtype):
    """Bias (by each row's group) and the activation, after a baseline's plain grouped matmul."""
    y = y.astype(jnp.float32)
    if bias is not None:
        ends = jnp.cumsum(group_sizes)
        group = jnp.searchsorted(ends, jnp.arange(y.shape[0]), side="right", method="compare_all")
        y = y + bias.astype(jnp.float32)[jnp.minimum(group, bias.shape[0] - 1)]
    if activation is not None:
        y = activation(y)
    return y.astype(dtype)


def ragged_dot_fn(activation):
    def run(lhs, rhs, gs, bias):
        y = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
        return epilogue_in_xla(y, gs, bias, activation, lhs.dtype)

    return jax.jit(run)


def ragged_dot_mgpu_fn(activation, kind: str, n: int):
    """jax's shipped kernel with its own example's tile sizes for this regime."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    block_m = 64 if kind == "decode" else 128
    block_n = 128 if n % 128 == 0 else 64
    config = dict(block_m=block_m, block_n=block_n, block_k=64, max_concurrent_steps=4, grid_block_n=1)
    accepted = inspect.signature(ragged_dot_mgpu.ragged_dot).parameters
    config = {k: v for k, v in config.items() if k in accepted}

    def run(lhs, rhs, gs, bias):
        y = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=gs, **config)
        return epilogue_in_xla(y, gs, bias, activation, lhs.dtype)

    return jax.jit(run), config


# ----------------------------------------------------------------------------------------------
# One shape


def relative_error(out, ref) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def floors(shape: Shape, group_sizes: np.ndarray, bandwidth: float, rate: float) -> dict:
    touched = int((group_sizes > 0).sum())
    out_cols = shape.n // 2 if shape.activation is not None else shape.n
    if shape.packed:  # codes (K padded to the kernel layout's chunk) and scales
        expert_bytes = (padded_features(shape.k) // 2 + shape.k // BLOCK) * shape.n
    else:
        expert_bytes = shape.k * shape.n * 2
    weight_bytes = touched * expert_bytes + (touched * shape.n * 2 if shape.model.bias else 0)
    bytes_moved = weight_bytes + shape.rows * (shape.k + out_cols) * 2
    flops = 2.0 * shape.rows * shape.k * shape.n
    return {
        "touched_experts": touched,
        "bytes": bytes_moved,
        "flops": flops,
        "bytes_floor_us": bytes_moved / bandwidth * 1e6,
        "flops_floor_us": flops / rate * 1e6,
    }


def timed(row: dict, key: str, fn, args) -> jax.Array | None:
    """Compile, run and time fn(*args) into row[key + '_us']; an error goes to row[key + '_error']."""
    try:
        out = jax.block_until_ready(fn(*args))
        row[f"{key}_us"], row[f"{key}_wall_us"] = device_time_us(fn, *args, iterations=20)
        return out
    except Exception as e:  # noqa: BLE001 - one implementation failing must not stop the table
        row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {key}: FAILED {row[f'{key}_error']}")
        return None


def time_jax_baselines(row: dict, shape: Shape, args) -> None:
    """jax's ragged_dot (unless its masked operand would not fit) and ragged_dot_mgpu, into row."""
    masked_bytes = shape.rows * shape.model.num_experts * shape.k * 2
    if masked_bytes > 8 << 30:
        row["ragged_dot_error"] = f"skipped: its masked operand would take {masked_bytes / 2**30:.0f} GiB"
    else:
        timed(row, "ragged_dot", ragged_dot_fn(shape.activation), args)
    try:
        mgpu, config = ragged_dot_mgpu_fn(shape.activation, shape.kind, shape.n)
        row["ragged_dot_mgpu_config"] = config
        timed(row, "ragged_dot_mgpu", mgpu, args)
    except Exception as e:  # noqa: BLE001 - e.g. the module moved
        row["ragged_dot_mgpu_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def bench_shape(shape: Shape, bandwidth: float, rate: float, tune: bool = False, baselines: bool = True) -> dict:
    """One shape's row; `baselines`: also time jax's ragged_dot and ragged_dot_mgpu (bf16 weights)."""
    row: dict = {"shape": shape.name, "problem": shape.problem, "kind": shape.kind, "rows": shape.rows,
                 "weights": shape.weights}
    args = make_inputs(shape)
    lhs, rhs, group_sizes, bias = args
    row.update(floors(shape, np.asarray(group_sizes), bandwidth, rate))
    plan = default_plan(m=shape.rows, k=shape.k, n=shape.n, num_groups=shape.model.num_experts,
                        activation=shape.activation, packed=shape.packed)
    row["plan"] = str(plan)
    log(f"{shape.name}: rows {shape.rows}, touched experts {row['touched_experts']}, {plan}")
    mosaic = mosaic_fn(shape.activation)
    out = timed(row, "mosaic", mosaic, args)
    if out is not None:
        # The kernel and the jnp prologue before it (the row tiles), each kernel's device time.
        row["mosaic_kernels"] = kernel_breakdown(mosaic, *args)
        kernel_only = [us for name, us in row["mosaic_kernels"] if KERNEL_NAME in name]
        if kernel_only:
            row["mosaic_kernel_only_us"] = sum(kernel_only)
        try:
            rows, ref = sampled_reference(lhs, rhs, np.asarray(group_sizes), bias, shape.activation)
            row["rel_err_sampled"] = relative_error(out[rows], ref)
            row["finite"] = bool(jnp.isfinite(out.astype(jnp.float32)).all())
        except Exception as e:  # noqa: BLE001
            row["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del out
    if shape.packed and shape.tokens == 1:
        timed(row, "xla", xla_fn(shape.activation), args)
    if baselines and not shape.packed:
        time_jax_baselines(row, shape, args)
    if "mosaic_us" in row:
        t = row["mosaic_us"]
        if shape.kind == "decode":
            row["floor_us"] = max(row["bytes_floor_us"], row["flops_floor_us"])
            row["metric"] = "bytes" if row["bytes_floor_us"] >= row["flops_floor_us"] else "flops"
            row["fraction"] = row["floor_us"] / t
            row["bar"] = DECODE_BAR
        else:
            row["floor_us"] = row["flops_floor_us"]
            row["metric"] = "flops"
            row["fraction"] = row["flops_floor_us"] / t
            row["bar"] = PREFILL_BAR
        if "mosaic_kernel_only_us" in row:
            row["kernel_only_fraction"] = row["floor_us"] / row["mosaic_kernel_only_us"]
        baseline_times = [row[k] for k in ("ragged_dot_us", "ragged_dot_mgpu_us", "xla_us") if k in row]
        if baseline_times:
            row["speedup_vs_best_baseline"] = min(baseline_times) / t
    if tune:
        row["plans"] = {}
        for plan in alternative_plans(shape):
            timings: dict = {}
            timed(timings, "mosaic", mosaic_fn(shape.activation, plan), args)
            row["plans"][str(plan)] = timings.get("mosaic_us", timings.get("mosaic_error"))
            log(f"  tune {plan}: {row['plans'][str(plan)]}")
    log(json.dumps({k: v for k, v in row.items() if k != "mosaic_kernels"}, default=str))
    for name, us in row.get("mosaic_kernels", []):
        log(f"    {us:9.1f} us  {name}")
    return row


# ----------------------------------------------------------------------------------------------
# Output


def markdown(rows: list[dict], bandwidth: float, rate: float) -> str:
    head = (
        f"{ceilings_sentence(bandwidth, rate)} Decode: floor = "
        f"max(bytes / copy, FLOPs / matmul), bar {DECODE_BAR}; prefill: FLOP/s / matmul rate, bar {PREFILL_BAR}.\n\n"
        "Mosaic us is the whole call (the row-tile prologue's small XLA kernels included); kernel only is "
        "the Mosaic kernel alone.\n\n"
        "MXFP4 rows: the floor counts the packed bytes; the baseline is the XLA path on the packed weights "
        "(1-token decode); `bf16 / mxfp4` is the bf16 row's Mosaic time over this row's.\n\n"
        "| shape | rows | experts touched | floor us | Mosaic us | vs floor (bar) | kernel only us (vs floor) "
        "| ragged_dot us | ragged_dot_mgpu us | XLA us | speedup vs best | bf16 / mxfp4 | rel err (32 rows) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        frac = ""
        if "fraction" in r:
            ok = "ok" if r["fraction"] >= r["bar"] else "BELOW"
            frac = f"{r['fraction']:.2f} ({r['metric']}, {ok})"
        skipped = r.get("ragged_dot_error", "").startswith("skipped")
        kernel_only = kernel_only_cell(r)
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r.get('touched_experts', '')} | {cell(r, 'floor_us')} "
            f"| {cell(r, 'mosaic_us')} "
            f"| {frac} | {kernel_only} | {'OOM-skip' if skipped else cell(r, 'ragged_dot_us')} "
            f"| {cell(r, 'ragged_dot_mgpu_us')} | {cell(r, 'xla_us')} "
            f"| {cell(r, 'speedup_vs_best_baseline', '{:.2f}x')} | {cell(r, 'speedup_vs_bf16', '{:.2f}x')} "
            f"| {cell(r, 'rel_err_sampled', '{:.1e}')} |"
        )
    return head + "\n".join(lines) + "\n"


def write_outputs(out_dir: str, rows: list[dict], bandwidth: float, rate: float) -> str:
    return kernel_report.write_outputs(out_dir, "grouped_matmul", markdown(rows, bandwidth, rate), log,
                                       {"rows": rows, "bandwidth": bandwidth, "rate": rate})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    parser.add_argument("--tune", action="store_true", help="also time other launch plans of the kernel")
    parser.add_argument("--budget-s", type=float, default=140.0, help="start no new shape after this many seconds")
    parser.add_argument("--mxfp4", action="store_true",
                        help="the MXFP4 models' shapes with bf16 and packed MXFP4 weights (no jax baselines)")
    args = parser.parse_args()
    start = time.time()
    out_dir = os.environ.get("OUT", ".")
    log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}")
    bandwidth, rate = ceilings()
    shapes = [s for name in args.models.split(",") for s in shapes_for(MODELS[name], mxfp4=args.mxfp4)]
    shapes = [s for s in shapes if not args.only or any(o in s.name for o in args.only.split(","))]
    rows: list[dict] = []
    for shape in shapes:
        if time.time() - start > args.budget_s:
            log(f"out of time budget: {shape.name} and the rest not run")
            break
        try:
            rows.append(bench_shape(shape, bandwidth, rate, tune=args.tune, baselines=not args.mxfp4))
            bf16 = [r for r in rows if r.get("problem") == shape.problem and r["weights"] == "bf16"]
            if shape.packed and bf16 and "mosaic_us" in bf16[0] and "mosaic_us" in rows[-1]:
                rows[-1]["speedup_vs_bf16"] = bf16[0]["mosaic_us"] / rows[-1]["mosaic_us"]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
            log(f"{shape.name}: ERROR {e!r:.400}\n{traceback.format_exc(limit=3)}")
            rows.append({"shape": shape.name, "rows": shape.rows, "mosaic_error": repr(e)[:300]})
        write_outputs(out_dir, rows, bandwidth, rate)
    print(write_outputs(out_dir, rows, bandwidth, rate), flush=True)
    log(f"total {time.time() - start:.0f} s")
    bad = [r["shape"] for r in rows if "mosaic_us" not in r or r.get("rel_err_sampled", 1.0) > 1e-2]
    if bad:
        print("MOSAIC FAILED OR WRONG:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
