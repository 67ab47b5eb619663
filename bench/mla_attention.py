"""MLA decode on the GPU at DeepSeek-V2-Lite's attention (16 heads, kv_lora_rank 512, rope 64, nope 128,
v 128; bf16, 16-token pages): the Mosaic absorbed kernel as latent bytes over the copy bandwidth
measured in the same run (bar >= 0.7), beside the absorbed XLA path and the expanded form (XLA:
gather the latents, up-project to per-head K/V, attend), each checked against the XLA absorbed path.

    python -m bench.mla_attention     # prints a markdown table; JSON to $OUT/mla_attention.json

A row checks the kernel at DeepSeek-V2/V3's 128 heads (two 64-head groups per token), and a last
one times a prefill (2 x 2048 fresh prompts) in all three: the kernel takes it as 4-token tiles
that each read their context (the engine runs every token in the absorbed form).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernels import ceilings, device_time_us
from pallas_kernels.mla_attention import gather_latents, mla_absorbed_xla, mla_expanded_xla
from pallas_kernels.mla_attention.mosaic_gpu import default_mla_plan, mla_absorbed_mosaic

HEADS, RANK, ROPE, NOPE, V_DIM, PAGE = 16, 512, 64, 128, 128, 16
SM_SCALE = (NOPE + ROPE) ** -0.5
# (name, requests, query tokens per request, context, heads)
SHAPES = [
    ("decode 32 x 2048", 32, 1, 2048, HEADS),
    ("decode 128 x 2048", 128, 1, 2048, HEADS),
    ("decode 256 x 2048", 256, 1, 2048, HEADS),
    ("decode 4 x 8192 (split-K)", 4, 1, 8192, HEADS),
    ("128 heads: decode 32 x 2048", 32, 1, 2048, 128),
    ("prefill 2 x 2048", 2, 2048, 2048, HEADS),
]
BAR = 0.7


def batch(num_seqs: int, q_len: int, kv_len: int, heads: int, seed: int = 0):
    """Absorbed inputs of equal requests (q_len tokens each, the last at kv_len - 1): (q_latent, q_pe,
    latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs), and q_nope with the weights that absorb
    into q_latent (W_UK [H, R, Dn], W_UV [H, R, Dv])."""
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 5)
    pages_per_seq = -(-kv_len // PAGE)
    num_pages = num_seqs * pages_per_seq
    pages = jax.random.normal(keys[0], (num_pages, PAGE, RANK + ROPE), jnp.bfloat16)
    w_uk = (jax.random.normal(keys[1], (heads, RANK, NOPE), jnp.float32) * RANK**-0.5).astype(jnp.bfloat16)
    w_uv = (jax.random.normal(keys[2], (heads, RANK, V_DIM), jnp.float32) * RANK**-0.5).astype(jnp.bfloat16)
    q_nope = jax.random.normal(keys[3], (num_seqs * q_len, heads, NOPE), jnp.bfloat16)
    q_pe = jax.random.normal(keys[4], (num_seqs * q_len, heads, ROPE), jnp.bfloat16)
    q_latent = jnp.einsum("thn,hrn->thr", q_nope, w_uk, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    meta = (
        jnp.full((num_seqs,), kv_len, jnp.int32),
        jnp.asarray(rng.permutation(num_pages).reshape(num_seqs, pages_per_seq), jnp.int32),
        jnp.arange(num_seqs + 1, dtype=jnp.int32) * q_len,
        jnp.array([num_seqs], jnp.int32),
    )
    return (q_latent, q_pe, pages, *meta), (q_nope, w_uk, w_uv)


def expanded_form(q_nope, q_pe, pages, kv_lens, page_indices, cu_q_lens, num_seqs, w_uk, w_uv):
    """The expanded form of the same step: every request's latents up-projected to per-head K/V."""
    cu_kv_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(kv_lens, dtype=jnp.int32)])
    latents = gather_latents(pages, page_indices, cu_kv_lens, page_indices.size * PAGE)  # [Tk, R + Dr]
    c_kv, k_pe = latents[:, :RANK], latents[:, RANK:]
    heads = w_uk.shape[0]
    k_nope = jnp.einsum("lr,hrn->lhn", c_kv, w_uk)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, None], (k_pe.shape[0], heads, ROPE))], axis=-1)
    v = jnp.einsum("lr,hrv->lhv", c_kv, w_uv)
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    return mla_expanded_xla(q, k, v, cu_q_lens, cu_kv_lens, num_seqs, sm_scale=SM_SCALE)  # [T, H, Dv]


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_shape(name: str, num_seqs: int, q_len: int, kv_len: int, heads: int, bandwidth: float) -> dict:
    absorbed, (q_nope, w_uk, w_uv) = batch(num_seqs, q_len, kv_len, heads)
    mosaic = jax.jit(lambda *a: mla_absorbed_mosaic(*a, sm_scale=SM_SCALE))
    xla = jax.jit(lambda *a: mla_absorbed_xla(*a, sm_scale=SM_SCALE))
    expanded = jax.jit(expanded_form)
    decode = q_len == 1
    plan = default_mla_plan(num_items=num_seqs * max(heads // 64, 1), max_kv_len=kv_len) if decode else None
    row: dict = {"shape": name, "heads": heads, "kv_splits": plan.kv_splits if plan else 1}
    ref = xla(*absorbed)
    row["mosaic_rel_err_vs_xla"] = relative_error(mosaic(*absorbed), ref)
    exp_args = (q_nope, *absorbed[1:], w_uk, w_uv)
    out_expanded = expanded(*exp_args)
    row["expanded_rel_err_vs_xla"] = relative_error(out_expanded, jnp.einsum("thr,hrv->thv", ref, w_uv))
    latent_bytes = num_seqs * kv_len * (RANK + ROPE) * 2
    row["floor_us"] = latent_bytes / bandwidth * 1e6
    row["mosaic_us"], _ = device_time_us(mosaic, *absorbed, iterations=20 if decode else 5)
    row["xla_us"], _ = device_time_us(xla, *absorbed, iterations=5 if decode else 2)
    row["expanded_us"], _ = device_time_us(expanded, *exp_args, iterations=3 if decode else 2)
    if decode:  # a prefill is not bound by its latent bytes
        row["fraction"] = row["floor_us"] / row["mosaic_us"]
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], bandwidth: float) -> str:
    lines = [
        f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; page {PAGE}; copy {bandwidth / 1e12:.2f} TB/s "
        f"(read + write) in the same run. Bar: latent bytes / copy BW / Mosaic time >= {BAR}.",
        "",
        "| shape | heads | splits | Mosaic us | latent bytes / copy BW | XLA absorbed us | expanded (XLA) us "
        "| Mosaic rel err | expanded rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = f"{r['fraction']:.2f}" if "fraction" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['heads']} | {r['kv_splits']} | {r['mosaic_us']:.1f} | {fraction} "
            f"| {r['xla_us']:.1f} | {r['expanded_us']:.1f} | {r['mosaic_rel_err_vs_xla']:.1e} "
            f"| {r['expanded_rel_err_vs_xla']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    start = time.time()
    bandwidth, _ = ceilings()
    rows = [bench_shape(*shape, bandwidth) for shape in SHAPES]
    table = markdown(rows, bandwidth)
    print(table, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "mla_attention.json").write_text(
            json.dumps({"device": jax.devices()[0].device_kind, "copy_bytes_per_s": bandwidth, "rows": rows}, indent=1))
        Path(out_dir, "mla_attention.md").write_text(table)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
