"""The floor of the offline `sharegpt_like` run: the least time any engine could take on a GPU, given
its measured memory bandwidth and matmul rate, under first-come-first-served scheduling.

The model (Llama-3.1-8B by default, bf16): all requests arrive at once and are admitted together
(the KV pool holds them all), prefills fill `--step-tokens` per step, then each decode step runs
every request still going. A step can go no faster than its weights' read or its matmuls,
whichever is longer, plus the read of its K/V (attention reads each context once per layer):

    step >= max(weight bytes / bandwidth, 2 * params * tokens / matmul rate) + KV bytes / bandwidth

(a prefill's attention counts its causal FLOPs at the matmul rate instead of K/V bytes).

Nothing else is counted: no sampling, no host time, no launch gaps, no padding, and the matmuls at
the full rate for any batch. The number of decode steps is the longest output (1,024 tokens), and
most of the late ones run a few requests: they cost a weight read each.

    python -m bench.offline_floor --bandwidth 3.0e12 --matmul 750e12    # H100 (copy 2.8-3.0 TB/s)
    python -m bench.offline_floor --bandwidth 4.0e12 --matmul 790e12    # H200
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import workload


def offline_floor(bandwidth: float, matmul: float, num_prompts: int = 1000, step_tokens: int = 16384,
                  hidden: int = 4096, vocab: int = 128256, params: float = 8.03e9, num_layers: int = 32,
                  num_q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2) -> dict:
    reqs = workload.sharegpt_like(num_prompts)
    ins = np.array([len(p) for p, _ in reqs])
    outs = np.array([n for _, n in reqs])
    embed = vocab * hidden  # a lookup, no FLOPs
    lm_head = vocab * hidden  # only for the rows that sample
    body = params - embed - lm_head
    kv_per_token = num_layers * kv_heads * head_dim * 2 * dtype_bytes  # K and V, every layer
    weight_read = (params - embed) * dtype_bytes / bandwidth

    # Prefill: every prompt token through the body, one sampled row per request.
    prefill_steps = int(np.ceil(ins.sum() / step_tokens))
    prefill_flops = 2 * body * ins.sum() + 2 * lm_head * len(reqs)
    prefill = max(prefill_flops / matmul, prefill_steps * weight_read)
    # Causal attention over each prompt: QK^T and PV, 2 FLOPs a multiply-add, half the square.
    prefill_attention = 2 * 2 * float((ins.astype(np.float64) ** 2 / 2).sum()) * num_q_heads * head_dim * num_layers
    prefill_attention /= matmul

    decode = attention = weight_bound_steps = 0.0
    for step in range(int(outs.max())):
        alive = outs > step
        rows = int(alive.sum())
        compute = 2 * (body + lm_head) * rows / matmul
        kv = float((ins[alive] + step).sum()) * kv_per_token / bandwidth
        decode += max(compute, weight_read) + kv
        attention += kv
        weight_bound_steps += compute < weight_read
    total = prefill + prefill_attention + decode
    return {
        "output_tokens": int(outs.sum()),
        "input_tokens": int(ins.sum()),
        "decode_steps": int(outs.max()),
        "weight_bound_decode_steps": int(weight_bound_steps),
        "prefill_s": round(prefill + prefill_attention, 2),
        "decode_s": round(decode, 2),
        "decode_attention_s": round(attention, 2),
        "floor_s": round(total, 2),
        "floor_output_tokens_per_s": round(outs.sum() / total, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidth", type=float, required=True, help="bytes/s the GPU reads (measured)")
    p.add_argument("--matmul", type=float, required=True, help="bf16 FLOP/s of a large matmul (measured)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--step-tokens", type=int, default=16384, help="prefill tokens per step")
    args = p.parse_args(argv)
    result = offline_floor(args.bandwidth, args.matmul, args.num_prompts, args.step_tokens)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
