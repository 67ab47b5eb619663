"""FP8 W8A8 matmuls on the GPU: XLA's FP8 dot (pallas_kernels/fp8_matmul/xla.py) against the bf16 dot the
model runs otherwise, on Llama-3.1-8B's four GEMMs as jaxllm fuses them, at prefill- and decode-sized M.

    python -m bench.fp8_matmul                  # the table (< 3 min on one H100)
    python -m bench.fp8_matmul --only "gate_up" # a subset (substrings of the shape names)

Per shape it times (CUPTI device time, median; bf16 activations in, bf16 out):
  - bf16: the bf16 layer's einsum;
  - fp8 dynamic: the FP8 twin's whole matmul (per-token activation amax + quantize, the FP8 dot, scales);
  - fp8 static: the same with a static input scale (no amax);
  - fp8 dot only: the FP8 dot on already-quantized activations, what cuBLASLt's GEMM alone takes;
  - fp8 block: 128 x 128 weight blocks (a dot batched over K's blocks, float32 partials summed);
and whether XLA compiled the dot to cuBLASLt's FP8 GEMM (a `__cublas$lt$matmul$f8` call in the
optimized HLO). TFLOP/s counts 2 M N K; "x bf16" is the bf16 time over each one's. Writes
fp8_matmul.md / .json / .log to $OUT (or the current directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench import kernel_report
from bench.kernel_report import Log
from bench.kernels import device_time_us
from pallas_kernels.fp8_matmul import Fp8Weights, fp8_matmul_xla, quantize_activations

# Llama-3.1-8B's projections as jaxllm holds them: the weight's [*N] and K.
LAYERS = {"qkv": ((8, 6, 128), 4096), "o": ((4096,), 4096), "gate_up": ((2, 14336), 4096), "down": ((4096,), 14336)}
TOKENS = (16, 256, 2048, 8192)
FP8_GEMM = "__cublas$lt$matmul$f8"

log = Log()


def weights(n_shape: tuple[int, ...], k: int, groups: int, static: bool) -> Fp8Weights:
    key = jax.random.key(0)
    values = jnp.clip(64 * jax.random.normal(key, (*n_shape, k), jnp.float32), -448, 448).astype(jnp.float8_e4m3fn)
    scales = jnp.full((*n_shape, groups), 0.02 / 64, jnp.float32)
    return Fp8Weights(values, scales, jnp.float32(4 / 448) if static else None)


def dot_only(xq: jax.Array, values: jax.Array) -> jax.Array:
    return jax.lax.dot_general(xq, values, (((1,), (values.ndim - 1,)), ((), ())), preferred_element_type=jnp.bfloat16)


def bench_shape(layer: str, m: int) -> dict:
    n_shape, k = LAYERS[layer]
    flops = 2 * m * int(np.prod(n_shape)) * k
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    bf16_w = (0.02 * jax.random.normal(jax.random.key(2), (*n_shape, k), jnp.float32)).astype(jnp.bfloat16)
    dynamic, static, block = (weights(n_shape, k, 1, False), weights(n_shape, k, 1, True),
                              weights(n_shape, k, k // 128, False))
    xq, _ = quantize_activations(x, None, 1)
    variants = {
        "bf16": (jax.jit(lambda x, w: jnp.einsum("mk,...k->m...", x, w)), (x, bf16_w)),
        "fp8 dynamic": (jax.jit(fp8_matmul_xla), (x, dynamic)),
        "fp8 static": (jax.jit(fp8_matmul_xla), (x, static)),
        "fp8 dot only": (jax.jit(dot_only), (xq, dynamic.values)),
        "fp8 block": (jax.jit(fp8_matmul_xla), (x, block)),
    }
    row = {"shape": f"{layer} M={m}", "flops": flops}
    for name, (fn, args) in variants.items():
        try:
            if name != "bf16":
                row[f"{name} cublaslt_fp8"] = FP8_GEMM in fn.lower(*args).compile().as_text()
            row[f"{name} us"], _ = device_time_us(fn, *args)
        except Exception as e:  # noqa: BLE001 - one failing variant is logged; the table goes on
            row[f"{name} error"] = repr(e)
            log(f"  {row['shape']} {name}: {e!r}")
            traceback.print_exc()
    log(row)
    return row


def markdown(rows: list[dict]) -> str:
    names = ("bf16", "fp8 dynamic", "fp8 static", "fp8 dot only", "fp8 block")
    head = "| shape | " + " | ".join(f"{n} us (TFLOP/s, x bf16)" for n in names) + " | cuBLASLt FP8 GEMM |"
    lines = [f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}.", "", head,
             "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = []
        for n in names:
            us = row.get(f"{n} us")
            speedup = row.get("bf16 us", float("nan")) / us if us else float("nan")
            cells.append("fail" if us is None else f"{us:.1f} ({row['flops'] / us / 1e6:.0f}, {speedup:.2f})")
        fp8_gemm = "/".join("y" if row.get(f"{n} cublaslt_fp8") else "n" for n in names[1:])
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {fp8_gemm} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names to run")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no new shape after this many seconds")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    start, rows = time.perf_counter(), []
    for layer in LAYERS:
        for m in TOKENS:
            name = f"{layer} M={m}"
            if only and not any(s in name for s in only):
                continue
            if time.perf_counter() - start > args.budget_s:
                log(f"budget spent: {name} and later shapes skipped")
                break
            rows.append(bench_shape(layer, m))
    table = kernel_report.write_outputs(os.environ.get("OUT", "."), "fp8_matmul", markdown(rows), log,
                                        {"rows": rows})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
