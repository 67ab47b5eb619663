"""The int4 matmul on the GPU: the Mosaic kernel against its roofline floor and two baselines.

    python -m bench.int4_matmul                      # Llama-3.1-8B's four GEMMs at M = 1, 8, 64, 256
    python -m bench.int4_matmul --only "M=1 ,M=8 "   # a subset (substrings of the shape names)
    python -m bench.int4_matmul --tune-s 0           # the table only (no other launch plans)

Per shape (group 128, zero points as in AWQ, bf16 activations), in one run with the device's copy
bandwidth and dense bf16 matmul rate (bench/kernels.py's `ceilings`), it times:
  - `int4_matmul_mosaic` (default plan; the whole call, and the Mosaic kernel alone), checked
    against the XLA path on the same weights;
  - `int4_matmul_xla`: dequantize to bf16 + XLA's dot (cuBLAS), the other prefill option;
  - jax's shipped `hopper_mixed_type_matmul_mgpu` (int8 weights x bf16, no scales: twice the
    weight bytes, so not the same problem; its example's tiles, weights as the int8 operand by
    computing out^T = W^T x^T).
Floor = max(bytes / copy bandwidth, FLOPs / matmul rate), bytes = packed int4 weights + scales +
zeros + x + out; bar >= 0.7 of it. One failing implementation or shape logs its error and the table
goes on. Times are CUPTI device time (median). After the table, while `--tune-s` seconds last,
other launch plans of the kernel (column block width, K splits, row block height) are timed on o
and gate_up at M = 1 and M = 256 and logged (int4_matmul_tune.md), to choose `default_plan` from. Writes
int4_matmul.md / .json / .log to $OUT (or the current directory); `--budget-s` stops starting new
table shapes after that many seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from bench import kernel_report
from bench.kernel_report import Log, ceilings_sentence, cell, kernel_only_cell
from bench.kernels import ceilings, device_time_us, kernel_breakdown
from pallas_kernels.int4_matmul import Int4Weights, int4_matmul_xla
from pallas_kernels.int4_matmul.mosaic_gpu import Plan, deepest_pipeline, default_plan, int4_matmul_mosaic

GROUP = 128
BAR = 0.7
TOKENS = (1, 8, 64, 256)
# Llama-3.1-8B's linear layers (K -> N), fused as jaxllm runs them.
LAYERS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
TUNE_LAYERS = ("o", "gate_up")  # the narrowest and the widest
KERNEL_NAME = "int4_matmul_kernel"  # the Mosaic kernel's CUDA name (its body function's)


log = Log()


@dataclasses.dataclass(frozen=True)
class Shape:
    layer: str
    m: int

    @property
    def k(self) -> int:
        return LAYERS[self.layer][0]

    @property
    def n(self) -> int:
        return LAYERS[self.layer][1]

    @property
    def name(self) -> str:
        return f"Llama-3.1-8B {self.layer} {self.k}->{self.n} M={self.m} "


def make_inputs(shape: Shape, seed: int = 0) -> tuple[jax.Array, Int4Weights]:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    groups = (shape.k // GROUP, shape.n)
    values = jax.random.randint(k1, (shape.k, shape.n), -8, 8, jnp.int8).astype(jnp.int4)
    scales = (jax.random.uniform(k2, groups, jnp.float32, 0.5, 1.5) / (8 * shape.k**0.5)).astype(jnp.bfloat16)
    zeros = jax.random.randint(k3, groups, -2, 3, jnp.int32).astype(jnp.bfloat16)
    x = jax.random.normal(k4, (shape.m, shape.k), jnp.float32).astype(jnp.bfloat16)
    return x, Int4Weights(values, scales, zeros, None, GROUP)


def floors(shape: Shape, bandwidth: float, rate: float) -> dict:
    groups = shape.k // GROUP * shape.n
    weight_bytes = shape.k * shape.n // 2 + 2 * groups * 2  # int4 values, bf16 scales and zeros
    bytes_moved = weight_bytes + shape.m * (shape.k + shape.n) * 2
    flops = 2.0 * shape.m * shape.k * shape.n
    floor_bytes, floor_flops = bytes_moved / bandwidth * 1e6, flops / rate * 1e6
    return {
        "bytes": bytes_moved,
        "flops": flops,
        "floor_us": max(floor_bytes, floor_flops),
        "metric": "bytes" if floor_bytes >= floor_flops else "flops",
    }


def mixed_type_fn(shape: Shape):
    """jax's hopper_mixed_type_matmul_mgpu on int8 weights: out = (W^T [N, K] int8 @ x^T [K, Mp])^T."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    padded = 64 if shape.m <= 64 else -(-shape.m // 256) * 256
    wg = mixed.MatmulDimension.M if padded == 64 else mixed.MatmulDimension.N
    config = mixed.TuningConfig(
        tile_m=128, tile_n=padded if padded == 64 else 128, tile_k=128 if padded == 64 else 64, max_concurrent_steps=4,
        epi_tile_n=64, epi_tile_m=64, wg_dimension=wg,
    )

    def run(x, weights_t):  # x [M, K] bf16, weights_t [N, K] int8
        x_t = jnp.pad(x, ((0, padded - shape.m), (0, 0))).T  # [K, Mp]
        out_t = mixed.mixed_matmul_kernel(weights_t, x_t, out_dtype=x.dtype, config=config)  # [N, Mp]
        return out_t[:, : shape.m].T

    return jax.jit(run), dataclasses.asdict(config)


def timed(row: dict, key: str, fn, args):
    """Compile, run and time fn(*args) into row[key + '_us']; an error goes to row[key + '_error']."""
    try:
        out = jax.block_until_ready(fn(*args))
        row[f"{key}_us"], row[f"{key}_wall_us"] = device_time_us(fn, *args, iterations=20)
        return out
    except Exception as e:  # noqa: BLE001 - one implementation failing must not stop the table
        row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {key}: FAILED {row[f'{key}_error']}")
        return None


def relative_error(out, ref) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_shape(shape: Shape, bandwidth: float, rate: float) -> dict:
    row: dict = {"shape": shape.name.strip(), "m": shape.m}
    row.update(floors(shape, bandwidth, rate))
    x, w = make_inputs(shape)
    plan = default_plan(m=shape.m, k=shape.k, n=shape.n)
    row["plan"] = str(plan)
    log(f"{shape.name}: {plan}")
    mosaic = jax.jit(int4_matmul_mosaic)
    out = timed(row, "mosaic", mosaic, (x, w))
    ref = timed(row, "xla", jax.jit(int4_matmul_xla), (x, w))
    if out is not None:
        row["mosaic_kernels"] = kernel_breakdown(mosaic, x, w)
        kernel_only = [us for name, us in row["mosaic_kernels"] if KERNEL_NAME in name]
        if kernel_only:
            row["mosaic_kernel_only_us"] = sum(kernel_only)
            row["kernel_only_fraction"] = row["floor_us"] / row["mosaic_kernel_only_us"]
        if ref is not None:
            row["rel_err_vs_xla"] = relative_error(out, ref)
        row["fraction"] = row["floor_us"] / row["mosaic_us"]
    del out, ref
    try:
        mixed, config = mixed_type_fn(shape)
        row["mixed_type_config"] = config
        weights_t = w.values.astype(jnp.int8).T  # [N, K]
        timed(row, "mixed_type", mixed, (x, weights_t))
    except Exception as e:  # noqa: BLE001 - e.g. the module moved
        row["mixed_type_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    baselines = [row[k] for k in ("xla_us", "mixed_type_us") if k in row]
    if "mosaic_us" in row and baselines:
        row["speedup_vs_best_baseline"] = min(baselines) / row["mosaic_us"]
    log(json.dumps({k: v for k, v in row.items() if k != "mosaic_kernels"}, default=str))
    for name, us in row.get("mosaic_kernels", []):
        log(f"    {us:9.1f} us  {name}")
    return row


def alternative_plans(shape: Shape) -> list[Plan]:
    """Other plans worth timing for this shape. Decode: 64-, 128- and 256-column blocks, each with
    the fewest K splits (a power of two) that give every SM a CTA, and the default's splits halved
    and doubled. Prefill: the other row block height, and 256-column blocks."""
    default = default_plan(m=shape.m, k=shape.k, n=shape.n)
    steps = shape.k // default.block_k
    if shape.m <= 64:
        candidates = []
        for width in (64, 128, 256):
            splits = 1
            while (shape.n // width) * splits < 132 and splits < 16 and steps % (splits * 2) == 0:
                splits *= 2
            candidates.append(Plan(64, width, 64, 1, splits))
        candidates += [dataclasses.replace(default, k_splits=max(1, default.k_splits // 2)),
                       dataclasses.replace(default, k_splits=default.k_splits * 2)]
    else:
        candidates = [Plan(128, 128, 64, 1), Plan(64, 128, 64, 1), Plan(64, 256, 64, 1)]
    plans = []
    for plan in candidates:
        plan = deepest_pipeline(plan)
        if plan != default and plan not in plans and shape.n % plan.block_n == 0 and steps % plan.k_splits == 0:
            plans.append(plan)
    return plans


def tune(shapes: list[Shape], deadline: float) -> list[dict]:
    """Time `alternative_plans` of each shape until the deadline; one row per (shape, plan)."""
    rows = []
    for shape in shapes:
        x, w = make_inputs(shape)
        for plan in [default_plan(m=shape.m, k=shape.k, n=shape.n), *alternative_plans(shape)]:
            if time.time() > deadline:
                log("tuning: out of time")
                return rows
            row = {"shape": shape.name.strip(), "plan": str(plan)}
            timed(row, "mosaic", jax.jit(lambda x, w, plan=plan: int4_matmul_mosaic(x, w, plan=plan)), (x, w))
            log(f"  tune {shape.name} {plan}: {row.get('mosaic_us', row.get('mosaic_error'))}")
            rows.append(row)
    return rows


def tune_markdown(rows: list[dict]) -> str:
    lines = [f"| {r['shape']} | {r['plan']} | {r.get('mosaic_us', 'fail')} |" for r in rows]
    return "| shape | plan (first: default) | Mosaic us |\n|---|---|---|\n" + "\n".join(lines) + "\n"


def markdown(rows: list[dict], bandwidth: float, rate: float) -> str:
    head = (
        f"{ceilings_sentence(bandwidth, rate)} Floor = "
        f"max(bytes / copy, FLOPs / matmul), bytes = int4 weights + bf16 scales and zeros (group {GROUP}) + x + "
        f"out; bar {BAR}. Mosaic us is the whole call (row padding and the split-K sum included); kernel only is "
        "the Mosaic kernel alone. mixed-type: jax's hopper_mixed_type_matmul_mgpu on int8 weights (2x the "
        "weight bytes, no scales).\n\n"
        "| shape | floor us (metric) | Mosaic us | vs floor (bar) | kernel only us (vs floor) | XLA dequant+dot us "
        "| mixed-type int8 us | speedup vs best | rel err vs XLA |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        frac = ""
        if "fraction" in r:
            frac = f"{r['fraction']:.2f} ({'ok' if r['fraction'] >= BAR else 'BELOW'})"
        kernel_only = kernel_only_cell(r)
        floor = f"{r['floor_us']:.1f} ({r['metric']})" if "floor_us" in r else ""
        lines.append(
            f"| {r['shape']} | {floor} | {cell(r, 'mosaic_us')} | {frac} | {kernel_only} | {cell(r, 'xla_us')} "
            f"| {cell(r, 'mixed_type_us')} | {cell(r, 'speedup_vs_best_baseline', '{:.2f}x')} "
            f"| {cell(r, 'rel_err_vs_xla', '{:.1e}')} |"
        )
    return head + "\n".join(lines) + "\n"


def write_outputs(out_dir: str, rows: list[dict], bandwidth: float, rate: float) -> str:
    return kernel_report.write_outputs(out_dir, "int4_matmul", markdown(rows, bandwidth, rate), log,
                                       {"rows": rows, "bandwidth": bandwidth, "rate": rate})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    parser.add_argument("--budget-s", type=float, default=100.0, help="start no new shape after this many seconds")
    parser.add_argument("--tune-s", type=float, default=20.0, help="seconds for other launch plans after the table")
    args = parser.parse_args()
    start = time.time()
    out_dir = os.environ.get("OUT", ".")
    log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}")
    bandwidth, rate = ceilings()
    shapes = [Shape(layer, m) for m in TOKENS for layer in LAYERS]
    shapes = [s for s in shapes if not args.only or any(o in s.name for o in args.only.split(","))]
    rows: list[dict] = []
    for shape in shapes:
        if time.time() - start > args.budget_s:
            log(f"out of time budget: {shape.name} and the rest not run")
            break
        try:
            rows.append(bench_shape(shape, bandwidth, rate))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
            log(f"{shape.name}: ERROR {e!r:.400}\n{traceback.format_exc(limit=3)}")
            rows.append({"shape": shape.name.strip(), "m": shape.m, "mosaic_error": repr(e)[:300]})
        write_outputs(out_dir, rows, bandwidth, rate)
    print(write_outputs(out_dir, rows, bandwidth, rate), flush=True)
    if args.tune_s > 0:
        tuned = tune([s for s in shapes if s.m in (1, 256) and s.layer in TUNE_LAYERS], time.time() + args.tune_s)
        with open(os.path.join(out_dir, "int4_matmul_tune.md"), "w") as f:
            f.write(tune_markdown(tuned))
        print(tune_markdown(tuned), flush=True)
    log(f"total {time.time() - start:.0f} s")
    bad = [r["shape"] for r in rows if "mosaic_us" not in r or r.get("rel_err_vs_xla", 1.0) > 1e-2]
    if bad:
        print("MOSAIC FAILED OR WRONG:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
