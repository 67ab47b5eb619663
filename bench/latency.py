"""Single-batch latency through `LLM.generate`, as vLLM's `benchmark_latency`: one batch at a time
(batch size 1 by default), EOS ignored, exactly --output-len tokens per request; warmup iterations
are run first and left out of the numbers. Every iteration gets fresh random prompts (workload.fixed
with its own seed), so no prefix-cache hit shortens a prefill.

    python -m bench.latency --model bench/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --max-model-len 4096 --input-len 32 --output-len 128 --batch-size 1 --output-json latency.json

Reported (ms; the JSON, then a markdown row of medians): end-to-end latency of one generate call
(mean/median/p99), per output token (latency / output_len), and from the engine's request
metrics the time to first token and the decode time per token after it
((e2e - ttft) / (output_len - 1)), the figure issue 8 bounds.

CPU smoke (bundled tiny model, vocab 512: workload ids are folded into it):
    JAX_PLATFORMS=cpu .venv/bin/python -m bench.latency --model jaxllm/data/stories260K \
        --max-model-len 256 --token-buckets 16 32 --input-len 16 --output-len 16 \
        --num-iters-warmup 1 --num-iters 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from bench import workload
from bench.common import add_engine_args, add_model_args, fold_into_vocab, llm_kwargs, summary_ms, write_json
from jaxllm import LLM, RequestOutput, SamplingParams


def latency_stats(latencies_s: Sequence[float], output_len: int, ttfts_s: Sequence[float] = (),
                  e2e_engine_s: Sequence[float] = ()) -> dict[str, float]:
    """Summary of measured iterations: e2e latency, per output token, and (from per-request engine
    metrics, where given) TTFT and the decode time per token after the first."""
    lat = np.asarray(latencies_s, dtype=float)
    out = {"num_iters": int(lat.size), **summary_ms(lat, "latency"), **summary_ms(lat / output_len, "per_token")}
    if len(ttfts_s) and len(e2e_engine_s) and output_len > 1:
        ttft, e2e = np.asarray(ttfts_s, dtype=float), np.asarray(e2e_engine_s, dtype=float)
        out |= summary_ms(ttft, "ttft") | summary_ms((e2e - ttft) / (output_len - 1), "decode_per_token")
    return out


def _prompts(iteration: int, args: argparse.Namespace, vocab_size: int) -> list[dict]:
    reqs = workload.fixed(args.batch_size, args.input_len, args.output_len, seed=1000 + iteration)
    return [{"prompt_token_ids": ids} for ids, _ in fold_into_vocab(reqs, vocab_size)]


def _one_iteration(llm: LLM, prompts: list[dict], params: SamplingParams, output_len: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs: list[RequestOutput] = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    counts = {len(o.outputs[0].token_ids) for o in outs}
    assert counts == {output_len}, f"expected {output_len} tokens per request, got {sorted(counts)}"
    return elapsed, [o.metrics for o in outs]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-iters-warmup", type=int, default=3)
    p.add_argument("--num-iters", type=int, default=10)
    add_engine_args(p)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    if args.input_len + args.output_len > args.max_model_len:
        p.error(f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds --max-model-len")

    t0 = time.perf_counter()
    llm = LLM(**llm_kwargs(args))
    startup_s = time.perf_counter() - t0
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    for i in range(args.num_iters_warmup):
        _one_iteration(llm, _prompts(-1 - i, args, vocab), params, args.output_len)
    latencies, metrics = [], []
    for i in range(args.num_iters):
        elapsed, m = _one_iteration(llm, _prompts(i, args, vocab), params, args.output_len)
        latencies.append(elapsed)
        metrics += m
    timed = [m for m in metrics if "time_to_first_token" in m and "e2e_latency" in m]
    stats = latency_stats(latencies, args.output_len, [m["time_to_first_token"] for m in timed],
                          [m["e2e_latency"] for m in timed])
    result = {
        **stats,
        "startup_s": round(startup_s, 1),
        "config": {k: v for k, v in vars(args).items() if k != "output_json"},
        "attention": llm.engine.runner.attention_name,
        "latencies_s": [round(x, 5) for x in latencies],
    }
    write_json(result, args.output_json)
    print(json.dumps(result, indent=1))
    print("| batch | input | output | median ms | p99 ms | ms/token | decode ms/token | TTFT ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    print(f"| {args.batch_size} | {args.input_len} | {args.output_len} | {stats['median_latency_ms']:.1f} | "
          f"{stats['p99_latency_ms']:.1f} | {stats['median_per_token_ms']:.2f} | "
          f"{stats.get('median_decode_per_token_ms', nan):.2f} | {stats.get('median_ttft_ms', nan):.1f} |")
    return result


if __name__ == "__main__":
    main()
