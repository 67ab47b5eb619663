"""Serving benchmark against a running jaxllm (or any OpenAI-compatible) server, as vLLM's `bench serve`.

    python -m bench.serve --base-url http://localhost:8000 --model MODEL --dataset sharegpt_like \
        --num-prompts 1000 --request-rate inf [--max-concurrency N] [--output-json out.json]

Requests are sent as token-id prompts to /v1/completions with `ignore_eos` and each request's own
max_tokens, streamed, so time to first token (TTFT), inter-token latency (ITL) and time per output
token (TPOT) are measured per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np

from bench.common import requests_for, write_json


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0.0}
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
                tokens += 1
    end = time.perf_counter()
    return {"ttft": arrivals[0] - start if arrivals else float("nan"), "itl": np.diff(arrivals).tolist(),
            "latency": end - start, "chunks": tokens, "output_tokens": max_tokens, "input_tokens": len(prompt)}


async def run(args) -> dict:
    reqs = requests_for(args.dataset, args.num_prompts, args.input_len, args.output_len)
    url = args.base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rng = np.random.default_rng(0)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def limited(prompt, n):
            if sem is None:
                return await _one(client, url, args.model, prompt, n)
            async with sem:
                return await _one(client, url, args.model, prompt, n)

        tasks = []
        start = time.perf_counter()
        for prompt, n in reqs:
            tasks.append(asyncio.create_task(limited(prompt, n)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results]) * 1000
    itl = np.array([x for r in results for x in r["itl"]]) * 1000
    tpot = np.array([(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in results if r["output_tokens"] > 1])
    out_tokens = sum(r["output_tokens"] for r in results)
    in_tokens = sum(r["input_tokens"] for r in results)
    return {
        "num_prompts": len(results), "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "duration_s": round(duration, 2), "request_throughput": round(len(results) / duration, 2),
        "output_tokens_per_s": round(out_tokens / duration, 1),
        "total_tokens_per_s": round((out_tokens + in_tokens) / duration, 1),
        "mean_ttft_ms": round(float(np.mean(ttft)), 1), "median_ttft_ms": round(float(np.median(ttft)), 1),
        "p99_ttft_ms": round(float(np.percentile(ttft, 99)), 1),
        "mean_tpot_ms": round(float(np.mean(tpot)) * 1000, 2),
        "median_tpot_ms": round(float(np.median(tpot)) * 1000, 2),
        "p99_tpot_ms": round(float(np.percentile(tpot, 99)) * 1000, 2),
        "mean_itl_ms": round(float(np.mean(itl)), 2), "median_itl_ms": round(float(np.median(itl)), 2),
        "p99_itl_ms": round(float(np.percentile(itl, 99)), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="sharegpt_like", choices=["sharegpt_like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print("\n".join(f"{k:>22}: {v}" for k, v in result.items()))
    write_json(result, args.output_json)
    return result


if __name__ == "__main__":
    main()
