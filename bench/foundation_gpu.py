"""Foundation check on a GPU (issue 3): Llama-3.1-8B dummy forward over a 2048-token prompt with
the XLA attention path, and a tiny fp32 checkpoint's GPU logits against transformers on CPU.

    PYTHONPATH=. python bench/foundation_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.runner.model_loading import load_model
from tests.paged import PagedRunner

CONFIG_8B = Path(__file__).parent / "configs" / "llama-3.1-8b" / "config.json"


def forward_8b(prompt_len: int = 2048) -> dict:
    d = Path(tempfile.mkdtemp())
    shutil.copy(CONFIG_8B, d / "config.json")
    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(model=str(d), load_format="dummy", dtype="bfloat16"), ParallelConfig())
    jax.block_until_ready(loaded.leaves)
    load_s = time.perf_counter() - t0
    runner = PagedRunner(loaded, "xla", page_size=16, num_pages=prompt_len // 16 + 8)
    prompt = np.random.default_rng(0).integers(1000, 120000, prompt_len).tolist()
    t0 = time.perf_counter()
    runner.step(prompt, 0, last_only=True)  # compile + run
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        logits = runner.step(prompt, 0, last_only=True)  # rewrites the same pages: same work each time
        times.append(time.perf_counter() - t0)
    return {
        "load_dummy_s": round(load_s, 2),
        "first_forward_incl_compile_s": round(first_s, 2),
        "forward_2048_median_ms": round(1000 * float(np.median(times)), 2),
        "forward_2048_min_ms": round(1000 * float(np.min(times)), 2),
        "logits_finite": bool(np.isfinite(logits).all()),
        "memory_stats": {k: v for k, v in (jax.devices()[0].memory_stats() or {}).items()
                         if k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")},
    }


def tiny_parity() -> dict:
    from tests.models.hf_tiny import hf_logits, make_checkpoint

    out = {}
    for family in ("llama3", "mistral", "qwen2", "qwen3"):
        d = make_checkpoint(family, Path(tempfile.mkdtemp()) / family)
        prompt = np.random.default_rng(1).integers(3, 320, 420).tolist()
        loaded = load_model(ModelConfig(model=str(d), dtype="float32"), ParallelConfig())
        ours, decoded = PagedRunner(loaded, "xla").run(prompt, [173, 247], 8)
        ref = hf_logits(d, prompt + decoded).numpy()
        greedy = [int(np.argmax(ref[419 + i])) for i in range(8)]
        out[family] = {"max_abs_diff": float(np.abs(ours - ref).max()), "greedy_equal": decoded == greedy}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    result["tiny_fp32_vs_transformers_cpu"] = tiny_parity()
    result["llama31_8b_dummy_bf16_xla"] = forward_8b()
    text = json.dumps(result, indent=1)
    Path(args.out, "foundation_gpu.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
