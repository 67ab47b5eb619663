"""Serving benchmark against a running jaxllm (or any OpenAI-compatible) server, as vLLM's `bench serve`.

    python -m bench.serve --base-url http://localhost:8000 --model MODEL --dataset sharegpt_like \
        --num-prompts 1000 --request-rate inf [--max-concurrency N] [--output-json out.json]

Requests are sent as token-id prompts to /v1/completions with `ignore_eos`, temperature 0 and each
request's own max_tokens, streamed (with stream_options.include_usage, so the output token count is
the server's), so time to first token (TTFT), inter-token latency (ITL) and time per output token
(TPOT) are measured per request; bench/serve_metrics.py holds the definitions. --request-rate inf
sends everything at once, a finite rate sends Poisson arrivals (exponential gaps, seed 0).
--max-concurrency caps requests in flight. One short test request runs first (not measured).
Streams are read by bench/sse_client.py (a lean asyncio HTTP/1.1 client: httpx took most of a
core at 1000 streams); httpx only lists the models. --model defaults to the server's first /v1/models entry.

CPU smoke (the bundled tiny model, vocab 512: --vocab-size folds the workload ids into it):
    JAX_PLATFORMS=cpu .venv/bin/python -m jaxllm.serve --port 8123 --max-model-len 512 \
        --token-buckets 16 64 &
    .venv/bin/python -m bench.serve --base-url http://localhost:8123 --vocab-size 512 \
        --num-prompts 8 --request-rate inf
    .venv/bin/python -m bench.serve --base-url http://localhost:8123 --vocab-size 512 \
        --dataset fixed --input-len 32 --output-len 16 --num-prompts 8 --request-rate 4 --max-concurrency 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx
import numpy as np

from bench.common import requests_for, write_json
from bench.serve_metrics import RequestResult, summarize, table
from bench.sse_client import HTTPProtocolError, StreamedResponse, post_stream

Sent = tuple[RequestResult, StreamedResponse | None]


async def _one(url: str, headers: dict[str, str], model: str, prompt: list[int], max_tokens: int) -> Sent:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    result = RequestResult(input_tokens=len(prompt), start=time.perf_counter())
    try:
        response = await post_stream(url, json.dumps(body).encode(), headers)
    except (OSError, HTTPProtocolError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
        result.end = time.perf_counter()
        return result, None
    result.end = time.perf_counter()
    return result, response


def read_events(sent: Sent) -> RequestResult:
    """Fill chunks, output_tokens and error from the raw response (after the run: JSON off the hot path)."""
    result, response = sent
    if response is None:
        return result
    if response.status != 200:
        result.error = f"HTTP {response.status}: {response.body.decode(errors='replace')[:200]}"
        return result
    usage_tokens = None
    try:
        for arrived, data in response.events:
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                break
            if chunk.get("choices"):
                result.chunks.append(arrived)
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
    except json.JSONDecodeError as e:
        result.error = f"JSONDecodeError: {e}"[:200]
    result.output_tokens = usage_tokens if usage_tokens is not None else len(result.chunks)
    return result


def arrival_offsets(n: int, request_rate: float, seed: int = 0) -> np.ndarray:
    """Send times (s from the start): all 0 at rate inf, else a Poisson process (first at 0)."""
    if request_rate == float("inf"):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


async def _model_name(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict:
    reqs = requests_for(args.dataset, args.num_prompts, args.input_len, args.output_len, args.vocab_size)
    base = args.base_url.rstrip("/")
    url = base + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(timeout=None, headers=headers) as client:
        model = args.model or await _model_name(client, base)
    test = read_events(await _one(url, headers, model, reqs[0][0], min(reqs[0][1], 4)))
    if not test.ok:
        raise SystemExit(f"test request failed: {test.error or 'no content chunk'}")

    async def limited(prompt: list[int], n: int) -> Sent:
        if sem is None:
            return await _one(url, headers, model, prompt, n)
        async with sem:
            return await _one(url, headers, model, prompt, n)

    tasks = []
    start = time.perf_counter()
    for (prompt, n), offset in zip(reqs, arrival_offsets(len(reqs), args.request_rate), strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(prompt, n)))
    sent = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    results = [read_events(s) for s in sent]
    unexpected = sum(r.ok and r.output_tokens != n for r, (_, n) in zip(results, reqs, strict=True))
    return {
        "model": model, "dataset": args.dataset, "num_prompts": len(reqs), "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, **summarize(results, duration),
        "requests_with_unexpected_length": unexpected,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--model", help="served model name (default: the server's first /v1/models entry)")
    p.add_argument("--dataset", default="sharegpt_like", choices=["sharegpt_like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024, help="--dataset fixed only")
    p.add_argument("--output-len", type=int, default=128, help="--dataset fixed only")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson), or inf")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--vocab-size", type=int, help="fold the workload's ids into a smaller vocabulary (tiny models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    write_json(result, args.output_json)
    print(table(result))
    if result["failed"] or result["requests_with_unexpected_length"]:
        print(f"WARNING: {result['failed']} failed, {result['requests_with_unexpected_length']} with a length "
              f"other than max_tokens; errors: {result['errors']}")
    return result


if __name__ == "__main__":
    main()
