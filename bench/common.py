"""Shared bench helpers: workloads, a model directory with a tokenizer beside the config."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path

from bench import workload

REPO = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = REPO / "tests" / "fixtures" / "llama3-tokenizer"


def model_dir_with_tokenizer(config_dir: str | Path) -> str:
    """A temp dir holding the config and the real Llama-3 tokenizer (the bench configs ship none)."""
    config_dir = Path(config_dir)
    if (config_dir / "tokenizer.json").exists() or (config_dir / "model.safetensors").exists():
        return str(config_dir)
    out = Path(tempfile.mkdtemp(prefix="jaxllm-bench-"))
    for f in config_dir.iterdir():
        shutil.copy(f, out / f.name)
    with gzip.open(LLAMA3_TOKENIZER / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(LLAMA3_TOKENIZER / "tokenizer_config.json", out / "tokenizer_config.json")
    return str(out)


def requests_for(dataset: str, num_prompts: int, input_len: int = 1024, output_len: int = 128):
    """[(prompt_token_ids, max_tokens)] of the named workload, with its own default vocabulary
    (ids below 128000, as for every engine measured on it)."""
    if dataset == "sharegpt_like":
        return workload.sharegpt_like(num_prompts)
    if dataset == "fixed":
        return workload.fixed(num_prompts, input_len, output_len)
    raise ValueError(f"unknown dataset {dataset!r}")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every offline bench takes."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--token-buckets", type=int, nargs="*")


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
