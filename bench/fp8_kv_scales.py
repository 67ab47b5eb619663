"""FP8 KV scales kept on the device (`--calculate-kv-scales`, a checkpoint's k_scale / v_scale) on the GPU,
at one Llama-3.1-8B attention layer (32 q / 8 kv heads, d 128, 16-token pages) through the Mosaic kernel:
`attend` (write this step's K/V, then attention) on e4m3 pages whose scales are

- static: AttentionParams' floats, folded into the kernel (the path without device scales);
- on device: `ScaledKvPages` holding the same scales, read as q * k_scale and out * v_scale around the kernel.
  Every step also measures max|K| and max|V| of its tokens (kept only while a scale is 0, the calibrating
  step), so the first step costs the same as the others.

Each row: median times (pages donated, as the engine runs), and the on-device output's error against the
static one (bf16 rounding of q * k_scale). The per-layer overhead times 32 layers is the step's.

    python -m bench.fp8_kv_scales   # prints a markdown table; $OUT/fp8_kv_scales.{md,log,json} if $OUT is set
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernel_report import Log, write_outputs
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.kv_scales import ScaledKvPages
from jaxllm.models.layers import Kernels, attend
from pallas_kernels.ragged_paged_attention import AttentionParams
from pallas_kernels.ragged_paged_attention.common import quantize_fp8
from pallas_kernels.ragged_paged_attention.mosaic_gpu import ragged_paged_attention_mosaic

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
# (name, new tokens per request, KV length per request after the step, requests)
SHAPES = [("decode 128 x 2048", 1, 2048, 128), ("decode 8 x 8192", 1, 8192, 8), ("prefill 2 x 2048", 2048, 2048, 2)]
PARAMS = AttentionParams(sm_scale=HEAD_DIM**-0.5)
KERNELS = Kernels(ragged_paged_attention_mosaic)


def step_inputs(q_len: int, kv_len: int, num_seqs: int, seed: int = 0):
    """bf16 q, k, v of this step's tokens, e4m3 pages holding the context (at the scales below), the batch,
    and (k_scale, v_scale) by vLLM's rule for this context."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-kv_len // PAGE)
    num_pages = num_seqs * pages_per_seq
    num_tokens = num_seqs * q_len
    q, k, v = (jnp.asarray(rng.standard_normal((num_tokens, h, HEAD_DIM)), jnp.bfloat16)
               for h in (Q_HEADS, KV_HEADS, KV_HEADS))
    context = jax.random.normal(jax.random.key(seed), (2, KV_HEADS, num_pages, PAGE, HEAD_DIM), jnp.bfloat16)
    scales = (float(jnp.abs(context[0]).max()) / 200, float(jnp.abs(context[1]).max()) / 100)
    pages = jnp.stack([quantize_fp8(context[0], scales[0]), quantize_fp8(context[1], scales[1])])
    page_indices = rng.permutation(num_pages).reshape(num_seqs, pages_per_seq).astype(np.int32)
    pos = np.arange(kv_len - q_len, kv_len)
    slots = (page_indices[:, pos // PAGE] * PAGE + pos % PAGE).reshape(-1).astype(np.int32)  # [T]
    batch = ForwardBatch(
        input_ids=jnp.zeros(num_tokens, jnp.int32), positions=jnp.asarray(np.tile(pos, num_seqs), jnp.int32),
        slot_mapping=jnp.asarray(slots), cu_q_lens=jnp.arange(num_seqs + 1, dtype=jnp.int32) * q_len,
        kv_lens=jnp.full((num_seqs,), kv_len, jnp.int32), page_indices=jnp.asarray(page_indices),
        num_seqs=jnp.array([num_seqs], jnp.int32), logits_indices=jnp.zeros(num_seqs, jnp.int32),
    )
    return q, k, v, pages, batch, scales


# One layer's step, its KV state donated as the engine's is.
_layer = jax.jit(attend, static_argnums=(5, 6), donate_argnums=(3,))


def median_ms(q, k, v, state, batch: ForwardBatch, params: AttentionParams,
              iters: int = 20) -> tuple[float, jax.Array]:
    """Median time of the layer's step on `state` (each call on the state the last one left); and the first
    call's output [T, Hq * D]."""
    first, state = _layer(q, k, v, state, batch, KERNELS, params)
    jax.block_until_ready((first, state))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out, state = _layer(q, k, v, state, batch, KERNELS, params)
        jax.block_until_ready((out, state))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), first


def main() -> None:
    log = Log()
    rows = []
    for name, q_len, kv_len, num_seqs in SHAPES:
        q, k, v, pages, batch, (k_scale, v_scale) = step_inputs(q_len, kv_len, num_seqs)
        static = dataclasses.replace(PARAMS, k_scale=k_scale, v_scale=v_scale)
        on_device = ScaledKvPages(jnp.copy(pages), jnp.array([k_scale, v_scale], jnp.float32))
        static_ms, want = median_ms(q, k, v, pages, batch, static)
        on_device_ms, got = median_ms(q, k, v, on_device, batch, PARAMS)
        want, got = want.astype(jnp.float32), got.astype(jnp.float32)
        row = {
            "shape": name,
            "rel_error_on_device_vs_static": float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)),
            "static_ms": static_ms,
            "on_device_ms": on_device_ms,
        }
        rows.append(row)
        log(row)
    table = "\n".join([
        f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; one layer's attend (K/V write + Mosaic "
        "attention) on e4m3 pages.",
        "",
        "| shape | static scales ms | scales on device ms | on device / static | rel. error on device vs static |",
        "|---|---|---|---|---|",
        *(f"| {r['shape']} | {r['static_ms']:.3f} | {r['on_device_ms']:.3f} | "
          f"{r['on_device_ms'] / r['static_ms']:.2f} | {r['rel_error_on_device_vs_static']:.1e} |" for r in rows),
        "",
    ])
    print(table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        write_outputs(out_dir, "fp8_kv_scales", table, log, {"device": str(jax.devices()[0]), "rows": rows})


if __name__ == "__main__":
    main()
