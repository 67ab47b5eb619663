"""Shared bench helpers: workloads, a model directory with a tokenizer beside the config."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench import workload

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
LLAMA3_VOCAB = 128256


def model_dir_with_tokenizer(config_dir: str | Path) -> str:
    """A temp dir holding the config and a real tokenizer (the bench configs ship none): Llama 3's,
    or Qwen2.5's (151,665 tokens) for a larger vocabulary (Qwen3, GLM-4), so the config's EOS ids
    are the tokenizer's."""
    config_dir = Path(config_dir)
    if (config_dir / "tokenizer.json").exists() or (config_dir / "model.safetensors").exists():
        return str(config_dir)
    out = Path(tempfile.mkdtemp(prefix="jaxllm-bench-"))
    for f in config_dir.iterdir():
        shutil.copy(f, out / f.name)
    copy_tokenizer("llama3" if config_vocab_size(config_dir) <= LLAMA3_VOCAB else "qwen2.5", out)
    return str(out)


def copy_tokenizer(name: str, out: Path) -> None:
    """The test fixture tokenizer `name` (tests/fixtures/<name>-tokenizer, gzipped) written into `out`."""
    fixture = FIXTURES / f"{name}-tokenizer"
    with gzip.open(fixture / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(fixture / "tokenizer_config.json", out / "tokenizer_config.json")


WORKLOAD_VOCAB = 128000  # workload.py's default vocabulary: its ids lie in [1000, 127000)


def requests_for(dataset: str, num_prompts: int, input_len: int = 1024, output_len: int = 128,
                 vocab_size: int | None = None) -> list[tuple[list[int], int]]:
    """[(prompt_token_ids, max_tokens)] of the named workload, with its own default vocabulary
    (ids below 128000, as for every engine measured on it). With `vocab_size` smaller than that
    (a tiny test model), the ids are folded into it (id % vocab_size); lengths stay the same."""
    if dataset == "sharegpt_like":
        reqs = workload.sharegpt_like(num_prompts)
    elif dataset == "fixed":
        reqs = workload.fixed(num_prompts, input_len, output_len)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    return fold_into_vocab(reqs, vocab_size)


def fold_into_vocab(reqs: list[tuple[list[int], int]], vocab_size: int | None) -> list[tuple[list[int], int]]:
    """The same requests with every id below `vocab_size` (unchanged when the vocabulary holds them)."""
    if vocab_size is None or vocab_size >= WORKLOAD_VOCAB:
        return reqs
    return [([t % vocab_size for t in ids], n) for ids, n in reqs]


def config_vocab_size(model_dir: str | Path) -> int:
    """vocab_size from a model directory's config.json (text_config's for multimodal configs)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


def summary_ms(values_s: list[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """{mean_/median_/p99_<prefix>_ms} of durations given in seconds (NaN when there are none)."""
    v = np.asarray(values_s, dtype=float) * 1000.0
    if v.size == 0:
        return {f"{k}_{prefix}_ms": float("nan") for k in ("mean", "median", "p99")}
    return {f"mean_{prefix}_ms": round(float(np.mean(v)), 3), f"median_{prefix}_ms": round(float(np.median(v)), 3),
            f"p99_{prefix}_ms": round(float(np.percentile(v, 99)), 3)}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every offline bench takes."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--token-buckets", type=int, nargs="*")
    parser.add_argument("--quantization", help="as the server's flag (fp8: the weights quantized to FP8 at load)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags of the benches that build an `LLM`."""
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, help="tokens per KV page (engine default 16)")


def llm_kwargs(args: argparse.Namespace) -> dict:
    """`LLM(**llm_kwargs(args))` from add_model_args + add_engine_args flags (the model gets its tokenizer)."""
    kwargs = dict(model=model_dir_with_tokenizer(args.model), load_format=args.load_format, dtype=args.dtype,
                  max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                  tensor_parallel_size=args.tensor_parallel_size)
    optional = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    token_buckets=args.token_buckets, block_size=args.block_size, quantization=args.quantization)
    return kwargs | {k: v for k, v in optional.items() if v}


def generate_counting_steps(llm, prompts, params, during=None) -> tuple[float, int]:
    """Run `llm.generate` (inside the context manager `during`, if given); returns (seconds, engine steps)."""
    import contextlib
    import time

    steps = 0
    step = llm.engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counted
    try:
        with during or contextlib.nullcontext():
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
    finally:
        llm.engine.step = step
    return elapsed, steps


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
