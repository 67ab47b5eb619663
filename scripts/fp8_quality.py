"""How much FP8 changes the bundled stories260K: the mean absolute difference of each token's logprob
against the bf16 model, over 512 tokens of its own stories, with FP8 W8A8 (`--quantization fp8`: one
scale per weight tensor, dynamic per-token activation scales), FP8 KV pages (`--kv-cache-dtype fp8`, with
scales of 1.0 or calibrated by `--calculate-kv-scales`) and both. Prefill runs in 64-token chunks, so
later chunks read earlier tokens back from the KV pages.

    python scripts/fp8_quality.py        # CPU is enough: prints a markdown table
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.config import DEFAULT_MODEL

STORIES = 2
TOKENS_PER_STORY = 256  # scored tokens per story: 2 x 256 = 512
CONFIGS = {
    "float32 (what bf16 rounding alone costs, for scale)": {"dtype": "float32"},
    "FP8 W8A8 (`--quantization fp8`)": {"quantization": "fp8"},
    "FP8 KV (`--kv-cache-dtype fp8`)": {"kv_cache_dtype": "fp8"},
    "FP8 KV, `--calculate-kv-scales`": {"kv_cache_dtype": "fp8", "calculate_kv_scales": True},
    "FP8 W8A8 + FP8 KV": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}


def engine(**options) -> LLM:
    settings = dict(dtype="bfloat16", compilation_cache_dir="", max_num_seqs=2, max_num_batched_tokens=64,
                    token_buckets=[64], max_model_len=512, async_scheduling=False)
    return LLM(DEFAULT_MODEL, **(settings | options))


def stories(llm: LLM) -> list[list[int]]:
    """BOS plus TOKENS_PER_STORY sampled tokens, one story per seed (the bf16 model's own text)."""
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=TOKENS_PER_STORY, ignore_eos=True)
              for seed in range(STORIES)]
    outputs = llm.generate([{"prompt_token_ids": [1]}] * STORIES, params, use_tqdm=False)
    return [[1, *out.outputs[0].token_ids] for out in outputs]


def token_logprobs(llm: LLM, texts: list[list[int]]) -> np.ndarray:
    """Each text's logprob of every token after BOS [STORIES * TOKENS_PER_STORY], teacher-forced."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": text} for text in texts], params, use_tqdm=False)
    return np.array([out.prompt_logprobs[i][token].logprob for out, text in zip(outputs, texts, strict=True)
                     for i, token in enumerate(text) if i > 0])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    baseline = engine()
    texts = stories(baseline)
    reference = token_logprobs(baseline, texts)
    print(f"stories260K, {reference.size} tokens, logprobs against bf16 (mean bf16 logprob {reference.mean():.3f})\n")
    print("| configuration | mean abs logprob difference | max abs difference |")
    print("|---|---|---|")
    for name, options in CONFIGS.items():
        diff = np.abs(token_logprobs(engine(**options), texts) - reference)
        print(f"| {name} | {diff.mean():.4f} | {diff.max():.4f} |")


if __name__ == "__main__":
    main()
