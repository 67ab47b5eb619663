"""Cost of constrained decoding per step (issue 6): a batch of N requests, half of them under a
JSON schema, against the same batch unconstrained. Offline, through `LLM`.

    python -m bench.structured_cost --model bench/configs/llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --max-model-len 4096 --batch 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.common import add_model_args, generate_counting_steps, model_dir_with_tokenizer
from jaxllm import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array",
                                                                                   "items": {"type": "string"}}},
    "required": ["name", "age", "tags"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    extra = {"token_buckets": args.token_buckets} if args.token_buckets else {}
    llm = LLM(model_dir_with_tokenizer(args.model), load_format=args.load_format, dtype=args.dtype,
              max_model_len=args.max_model_len, **extra)  # default budgets: shares the offline bench's compiles
    rng = np.random.default_rng(0)
    high = min(100000, llm.engine.vocab_size)
    prompts = [{"prompt_token_ids": rng.integers(high // 100, high, 128).tolist()} for _ in range(args.batch)]
    free = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1)
    constrained = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=1,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    generate_counting_steps(llm, prompts[:4], [free, constrained] * 2)  # warm: compiles the bitmask sampler variant
    base_s, base_steps = generate_counting_steps(llm, prompts, [free] * args.batch)
    mixed = [constrained if i % 2 else free for i in range(args.batch)]
    mixed_s, mixed_steps = generate_counting_steps(llm, prompts, mixed)
    result = {
        "batch": args.batch, "constrained": args.batch // 2,
        "unconstrained_ms_per_step": round(1000 * base_s / base_steps, 2),
        "half_constrained_ms_per_step": round(1000 * mixed_s / mixed_steps, 2),
        "steps": [base_steps, mixed_steps],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
