"""jaxllm against HF transformers on the same model shape and workload, one machine, consecutive runs.

HF runs its continuous batching (the `generate_batch` manager, each request with its own
max_new_tokens) and static `generate` over padded batches (--hf-batch-size, workload order), both
with random weights from the config, greedy, EOS ignored, on cuda in bfloat16 where there is a GPU
(else CPU float32). HF is slow, so it runs a subset (--num-prompts: the workload's own seeded set of
that size, the one `bench.throughput --num-prompts N` runs too) and each engine stops at
--max-seconds, reporting the tokens done in that time (`truncated`: true in the JSON).
jaxllm's figure comes from --jaxllm-json (a bench.throughput result) or --run-jaxllm (runs
bench.throughput on the same requests first, in a subprocess, before torch takes GPU memory);
the ratios are jaxllm output tokens/s over each HF engine's; `same_requests` says whether the two
measured the same requests. Printed: the JSON, then a markdown table.

    python -m bench.hf_compare --model bench/configs/llama-3.1-8b --max-model-len 4096 \
        --num-prompts 200 --max-seconds 90 --run-jaxllm --output-json hf.json
    python -m bench.hf_compare --model bench/configs/llama-3.1-8b --jaxllm-json offline-xla.json

CPU smoke (tiny model, vocab 512: the workload ids are folded into it; one torch thread, as a
shared CPU makes torch's threads spin; --max-seconds 1.5 with --dataset fixed --output-len 300 shows
the truncation):
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.hf_compare --model jaxllm/data/stories260K \
        --num-prompts 8 --max-seconds 60 --hf-batch-size 4
and with jaxllm run on the same requests first:
    JAX_PLATFORMS=cpu OMP_NUM_THREADS=1 .venv/bin/python -m bench.hf_compare --model jaxllm/data/stories260K \
        --num-prompts 8 --max-model-len 512 --token-buckets 16 64 --run-jaxllm --max-seconds 30 --hf-batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from bench.common import add_model_args, config_vocab_size, requests_for, write_json

ENGINES = {"cb": "hf_continuous_batching", "static": "hf_static_generate"}


def _workload_key(cfg: dict) -> tuple:
    fixed = cfg.get("dataset") == "fixed"
    return cfg.get("dataset"), cfg.get("num_prompts"), cfg.get("input_len") if fixed else None, \
        cfg.get("output_len") if fixed else None


def run_jaxllm(args: argparse.Namespace, dtype: str) -> dict:
    """bench.throughput on the same requests, in its own process; its JSON result."""
    out = Path(tempfile.mkdtemp(prefix="hf-compare-")) / "jaxllm.json"
    cmd = [sys.executable, "-m", "bench.throughput", "--model", args.model, "--dtype", dtype,
           "--load-format", "dummy" if args.load_format == "auto" else args.load_format,
           "--max-model-len", str(args.max_model_len), "--dataset", args.dataset,
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--output-json", str(out), *shlex.split(args.jaxllm_args)]
    if args.token_buckets:
        cmd += ["--token-buckets", *map(str, args.token_buckets)]
    print("running:", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, timeout=args.jaxllm_timeout).returncode
    if rc != 0 or not out.exists():
        raise SystemExit(f"bench.throughput failed (rc {rc}); run it alone or pass --jaxllm-json")
    return json.loads(out.read_text())


def ratios(jaxllm: dict, hf: dict[str, dict]) -> dict[str, float]:
    """jaxllm output tokens/s over each HF engine's."""
    tps = jaxllm["output_tokens_per_s"]
    return {name: round(tps / r["output_tokens_per_s"], 2) for name, r in hf.items() if r["output_tokens_per_s"]}


def _hf_runs(args: argparse.Namespace, reqs: list[tuple[list[int], int]], device: str, torch_dtype) -> dict:
    from bench import hf_engines

    model = hf_engines.load_random_model(args.model, device, torch_dtype)
    results = {}
    for key in args.engines:
        print(f"HF {ENGINES[key]} on {len(reqs)} requests (at most {args.max_seconds:.0f} s)...", flush=True)
        try:
            if key == "cb":
                r = hf_engines.run_continuous_batching(model, reqs, args.max_seconds, device, args.hf_num_blocks,
                                                       args.hf_max_batch_tokens)
            else:
                r = hf_engines.run_static(model, reqs, args.max_seconds, device, args.hf_batch_size)
        except Exception as e:  # one engine failing still reports the other
            traceback.print_exc()
            results[ENGINES[key]] = {"engine": ENGINES[key], "error": f"{type(e).__name__}: {e}",
                                     "output_tokens_per_s": 0.0, "truncated": False}
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        results[r["engine"]] = r
        print(f"  {r['output_tokens_per_s']} output tokens/s: {r['output_tokens']} of {r['requested_output_tokens']}"
              f" tokens in {r['elapsed_s']} s" + (" (TRUNCATED at --max-seconds)" if r["truncated"] else ""),
              flush=True)
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dataset", default="sharegpt_like", choices=["sharegpt_like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=1024, help="--dataset fixed only")
    p.add_argument("--output-len", type=int, default=128, help="--dataset fixed only")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    p.add_argument("--max-seconds", type=float, default=90.0, help="time budget of each HF engine")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static generate batch size")
    p.add_argument("--hf-num-blocks", type=int, help="HF paged cache blocks (default: HF's own sizing on GPU)")
    p.add_argument("--hf-max-batch-tokens", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--jaxllm-json", help="a bench.throughput --output-json result to compare with")
    p.add_argument("--run-jaxllm", action="store_true", help="run bench.throughput on the same requests first")
    p.add_argument("--jaxllm-args", default="", help="more bench.throughput flags, one string")
    p.add_argument("--jaxllm-timeout", type=float, default=1200.0)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    if args.jaxllm_json and args.run_jaxllm:
        p.error("--jaxllm-json and --run-jaxllm exclude each other")
    if args.hf_batch_size < 1 or args.num_prompts < 1:
        p.error("--hf-batch-size and --num-prompts must be positive")

    # random weights from a local config: nothing to fetch (and HF's flash-kernel probe must not try to)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    jaxllm = run_jaxllm(args, dtype) if args.run_jaxllm else None
    if args.jaxllm_json:
        jaxllm = json.loads(Path(args.jaxllm_json).read_text())
    reqs = requests_for(args.dataset, args.num_prompts, args.input_len, args.output_len,
                        config_vocab_size(args.model))
    hf = _hf_runs(args, reqs, device, getattr(torch, dtype))
    result = {
        "dataset": args.dataset, "num_prompts": args.num_prompts, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "max_seconds_per_engine": args.max_seconds, "hf": hf,
        "config": {k: v for k, v in vars(args).items() if k != "output_json"},
    }
    if jaxllm is not None:
        same = _workload_key(jaxllm.get("config", {}) | {"num_prompts": jaxllm.get("num_prompts")}) \
            == _workload_key(vars(args))
        result["jaxllm"] = {k: jaxllm.get(k) for k in ("output_tokens_per_s", "total_tokens_per_s", "elapsed_s",
                                                       "num_prompts", "dataset", "attention")}
        result["same_requests"] = same
        result["ratio_jaxllm_over"] = ratios(jaxllm, hf)
    write_json(result, args.output_json)
    print(json.dumps(result, indent=1))
    print(summary_table(result))
    return result


def summary_table(result: dict) -> str:
    """Markdown rows: each engine's output tokens/s, then jaxllm's ratio over each HF engine."""
    rows = ["| engine | output tok/s | tokens done / asked | seconds | note |", "|---|---:|---:|---:|---|"]
    for name, r in result["hf"].items():
        note = r.get("error") or ("TRUNCATED at --max-seconds" if r["truncated"] else "")
        rows.append(f"| {name} | {r['output_tokens_per_s']} | {r.get('output_tokens')} / "
                    f"{r.get('requested_output_tokens')} | {r.get('elapsed_s')} | {note} |")
    if "jaxllm" in result:
        j = result["jaxllm"]
        same = "same requests" if result["same_requests"] else "NOT the requests HF ran: a different workload"
        rows.append(f"| jaxllm ({j.get('attention')}) | {j['output_tokens_per_s']} | {j.get('num_prompts')} requests | "
                    f"{j.get('elapsed_s')} | {same} |")
        rows += [f"| jaxllm / {name} | {ratio}x | | | {'HF truncated' if result['hf'][name]['truncated'] else ''} |"
                 for name, ratio in result["ratio_jaxllm_over"].items()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["hf"].values()) else 0)
