"""Single-request decode on int4 weights (dummy AWQ layout by default) against its floor.

    python -m bench.int4_latency                           # Llama-3.1-8B config, awq, 32 in / 128 out
    python -m bench.int4_latency --baseline                # the bf16 model too, in the same run

Floor (issue 25): the bytes one decode token reads, over the device's copy bandwidth (bench/kernels.py's
`ceilings`, measured in the same run): the packed int4 weights (K * N / 2), their bf16 scales, the zero
points as the checkpoint packs them (4 bits per group and column), the bf16 lm_head and one embedding row,
the norms, and the KV pages the token attends over (mean context of the decode). jaxllm keeps the zero
points in bf16 (the kernel subtracts them in bf16): those bytes are reported beside the floor as
`zeros_bf16_extra_gb`, and `floor_layout_ms` counts them. Bar: decode ms/token <= 1.4x the floor.

The decode time per token is the engine's ((e2e - ttft) / (output_len - 1)), median over the measured
iterations, each on a fresh random prompt (workload.fixed), EOS ignored. Writes int4_latency.json and
int4_latency.md to $OUT (or the current directory). Under 3 minutes on an H100 (about one more minute
with --baseline).

CPU smoke (a tiny config with int4-sized dims, random weights; no floor):
    JAX_PLATFORMS=cpu .venv/bin/python -m bench.int4_latency --tiny --max-model-len 256 --input-len 16 \
        --output-len 16 --num-iters-warmup 1 --num-iters 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import jax

from bench import workload
from bench.common import fold_into_vocab, model_dir_with_tokenizer, write_json
from bench.latency import latency_stats
from jaxllm import LLM, SamplingParams
from jaxllm.model_arch import ModelArch, load_arch

BAR = 1.4
PROMPT_BUCKET = 64  # tokens: the largest step (--input-len at most this)
KV_POOL_BYTES = 2 << 30
GROUP = 128
BF16 = 2
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64)


def decode_bytes(arch: ModelArch, context: float, int4: bool) -> dict[str, float]:
    """Bytes one decode token reads, by part (GB), at a mean context of `context` tokens."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    linears = layers * (h * (arch.q_size + 2 * arch.kv_size) + arch.q_size * h + h * 2 * i + i * h)  # K * N summed
    out = {
        "lm_head_gb": arch.vocab_size * h * BF16 / 1e9,
        "embedding_row_and_norms_gb": (h + (2 * layers + 1) * h) * BF16 / 1e9,
        "kv_gb": layers * 2 * arch.kv_size * BF16 * context / 1e9,
    }
    if int4:
        out |= {"int4_values_gb": linears / 2 / 1e9, "scales_gb": linears / GROUP * BF16 / 1e9,
                "zeros_4bit_gb": linears / GROUP / 2 / 1e9}
    else:
        out |= {"bf16_weights_gb": linears * BF16 / 1e9}
    return out


def run_one(model_dir: str, args: argparse.Namespace, quantization: str | None) -> dict:
    # One request at a time: two token buckets (decode, the prompt) keep the compiles short; a KV pool of
    # its own size, so that the --baseline engine still fits beside this one (LLM has no shutdown).
    llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              quantization=quantization, max_num_seqs=1, max_num_batched_tokens=PROMPT_BUCKET,
              token_buckets=[16, PROMPT_BUCKET], kv_cache_memory_bytes=KV_POOL_BYTES)
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    vocab = llm.engine.vocab_size
    metrics = []
    for it in range(-args.num_iters_warmup, args.num_iters):
        reqs = fold_into_vocab(workload.fixed(1, args.input_len, args.output_len, seed=2000 + it), vocab)
        outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in reqs], params, use_tqdm=False)
        if it >= 0:
            metrics += [o.metrics for o in outs]
    timed = [m for m in metrics if "time_to_first_token" in m and "e2e_latency" in m]
    e2e = [m["e2e_latency"] for m in timed]
    stats = latency_stats(e2e, args.output_len, [m["time_to_first_token"] for m in timed], e2e)
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/configs/llama-3.1-8b")
    p.add_argument("--tiny", action="store_true", help="the model's config shrunk to int4-sized dims (CPU smoke)")
    p.add_argument("--quantization", default="awq", choices=("awq", "gptq", "compressed-tensors"))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="also time the bf16 model")
    args = p.parse_args()
    if args.input_len > PROMPT_BUCKET:
        p.error(f"--input-len is at most {PROMPT_BUCKET} (one prefill step)")
    model_dir = Path(model_dir_with_tokenizer(args.model))
    if args.tiny:
        tiny_dir = Path(tempfile.mkdtemp(prefix="jaxllm-int4-tiny-"))
        for f in model_dir.iterdir():
            (tiny_dir / f.name).write_bytes(f.read_bytes())
        config = json.loads((model_dir / "config.json").read_text())
        (tiny_dir / "config.json").write_text(json.dumps(config | TINY))
        model_dir = tiny_dir
    arch = load_arch(model_dir)
    on_gpu = jax.devices()[0].platform == "gpu"
    if on_gpu:
        from bench.kernels import ceilings  # noqa: PLC0415 - CUPTI timing, GPU only

        bandwidth, _ = ceilings()
    else:
        bandwidth = float("nan")
    context = args.input_len + args.output_len / 2
    parts = decode_bytes(arch, context, int4=True)
    floor_gb = sum(parts.values())
    zeros_bf16_extra_gb = parts["zeros_4bit_gb"] * 3  # jaxllm's bf16 zero points: 16 bits, not 4
    floor_ms = floor_gb * 1e9 / bandwidth * 1e3
    stats = run_one(str(model_dir), args, args.quantization)
    decode_ms = stats["median_decode_per_token_ms"]
    result = {
        "device": str(jax.devices()[0].device_kind), "model": args.model, "quantization": args.quantization,
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "bytes_per_token": {k: round(v, 4) for k, v in parts.items()}, "floor_gb": round(floor_gb, 4),
        "floor_ms": round(floor_ms, 3), "zeros_bf16_extra_gb": round(zeros_bf16_extra_gb, 4),
        "floor_layout_ms": round((floor_gb + zeros_bf16_extra_gb) * 1e9 / bandwidth * 1e3, 3),
        "int4": stats, "decode_ms_per_token": decode_ms, "x_floor": round(decode_ms / floor_ms, 3), "bar": BAR,
        "config": vars(args),
    }
    rows = [f"| {args.quantization} int4 | {decode_ms:.2f} | {floor_ms:.2f} | {decode_ms / floor_ms:.2f}x |"]
    if args.baseline:
        bf16_parts = decode_bytes(arch, context, int4=False)
        bf16_floor_ms = sum(bf16_parts.values()) * 1e9 / bandwidth * 1e3
        baseline = run_one(str(model_dir), args, None)
        bf16_ms = baseline["median_decode_per_token_ms"]
        result |= {"bf16": baseline, "bf16_floor_ms": round(bf16_floor_ms, 3)}
        rows.append(f"| bf16 | {bf16_ms:.2f} | {bf16_floor_ms:.2f} | {bf16_ms / bf16_floor_ms:.2f}x |")
    table = "\n".join([
        f"{result['device']}, {args.model}, {args.input_len} in / {args.output_len} out, batch 1, copy "
        f"{result['copy_bandwidth_tb_s']} TB/s; bar: int4 <= {BAR}x its floor",
        "", "| weights | decode ms/token (median) | floor ms | x floor |", "|---|---:|---:|---:|", *rows, ""])
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, str(out_dir / "int4_latency.json"))
    (out_dir / "int4_latency.md").write_text(table)
    print(json.dumps(result, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
