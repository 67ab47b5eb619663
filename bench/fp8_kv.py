"""FP8 KV pages on the GPU, at Llama-3.1-8B's attention (32 q / 8 kv heads, d 128, 16-token pages):
the Mosaic kernel on e4m3 pages against the XLA path on the same pages (the kernel's PTX only
compiles on a GPU), and its time against the same batch on bf16 pages.

    python -m bench.fp8_kv          # writes $OUT/fp8_kv.json and prints a markdown table
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import AttentionParams, ragged_paged_attention_xla
from pallas_kernels.ragged_paged_attention.common import quantize_fp8
from pallas_kernels.ragged_paged_attention.mosaic_gpu import ragged_paged_attention_mosaic

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
K_SCALE, V_SCALE = 0.05, 0.05  # amax / 200 and / 100 for unit-normal K/V of a few sigma, as vLLM's rule
# (name, query tokens per request, KV length per request, requests)
SHAPES = [("decode 128 x 2048", 1, 2048, 128), ("decode 8 x 8192", 1, 8192, 8), ("prefill 2 x 2048", 2048, 2048, 2)]


def batch(q_len: int, kv_len: int, num_seqs: int, seed: int = 0):
    """bf16 q and pages, the same pages in e4m3, and the batch's metadata."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-kv_len // PAGE)
    num_pages = num_seqs * pages_per_seq
    q = jnp.asarray(rng.standard_normal((num_seqs * q_len, Q_HEADS, HEAD_DIM)), jnp.bfloat16)
    kv = jax.random.normal(jax.random.key(seed), (2, KV_HEADS, num_pages, PAGE, HEAD_DIM), jnp.bfloat16)
    fp8 = jnp.stack([quantize_fp8(kv[0], K_SCALE), quantize_fp8(kv[1], V_SCALE)])
    meta = (
        jnp.full((num_seqs,), kv_len, jnp.int32),
        jnp.asarray(rng.permutation(num_pages).reshape(num_seqs, pages_per_seq), jnp.int32),
        jnp.arange(num_seqs + 1, dtype=jnp.int32) * q_len,
        jnp.array([num_seqs], jnp.int32),
    )
    return q, kv, fp8, meta


def median_ms(fn, *args, iters: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    params = AttentionParams(sm_scale=HEAD_DIM**-0.5)
    fp8_params = AttentionParams(sm_scale=HEAD_DIM**-0.5, k_scale=K_SCALE, v_scale=V_SCALE)
    mosaic = jax.jit(ragged_paged_attention_mosaic, static_argnums=(6,))
    xla = jax.jit(ragged_paged_attention_xla, static_argnums=(6,))
    rows = []
    for name, q_len, kv_len, num_seqs in SHAPES:
        q, kv, fp8, meta = batch(q_len, kv_len, num_seqs)
        out = mosaic(q, fp8, *meta, fp8_params).astype(jnp.float32)
        want = xla(q, fp8, *meta, fp8_params).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
        rows.append({
            "shape": name,
            "rel_error_vs_xla": rel,
            "bf16_pages_ms": median_ms(mosaic, q, kv, *meta, params),
            "fp8_pages_ms": median_ms(mosaic, q, fp8, *meta, fp8_params),
        })
        print(json.dumps(rows[-1]), flush=True)
    print("| shape | bf16 pages ms | fp8 pages ms | fp8 / bf16 | rel. error vs XLA |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['bf16_pages_ms']:.3f} | {r['fp8_pages_ms']:.3f} | "
              f"{r['fp8_pages_ms'] / r['bf16_pages_ms']:.2f} | {r['rel_error_vs_xla']:.1e} |")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "fp8_kv.json").write_text(json.dumps({"device": str(jax.devices()[0]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
