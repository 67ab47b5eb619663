"""What a decode step spends its time on (issue 8): a profiler trace of engine steps, summarised.

Runs decode-heavy batches through `LLM.generate` under `jax.profiler.trace`, then reads the Perfetto
trace back and prints, per scenario: wall time per step, device busy time per step (the union of the
GPU kernels' intervals), the gaps between them, and the kernels that take the most time.

    PYTHONPATH=. python3 bench/step_trace.py --model bench/configs/llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --out $OUT/trace
    # CPU smoke: --model jaxllm/data/stories260K --batches 1 4 --output-len 8 --max-model-len 256
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench import workload
from bench.common import (
    add_engine_args,
    add_model_args,
    fold_into_vocab,
    generate_counting_steps,
    llm_kwargs,
    requests_for,
    write_json,
)
from jaxllm import LLM, SamplingParams


def load_trace(log_dir: Path) -> list[dict]:
    files = sorted(log_dir.rglob("perfetto_trace.json.gz")) or sorted(log_dir.rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no trace under {log_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict]) -> list[dict]:
    """Complete events ('X') on device streams (the GPU's; the host's XLA ops on a CPU)."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    pids = gpu or {pid for pid, name in names.items() if "CPU" in name or "cpu" in name}
    out = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]
    # A GPU's process also holds derived lines (XLA Modules, XLA Ops) over its streams' kernels.
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    streams = {key for key, name in threads.items() if key[0] in gpu and name.lower().startswith("stream")}
    return [e for e in out if (e["pid"], e.get("tid")) in streams] if streams else out


def busy_us(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur) intervals."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    total, end = 0.0, -np.inf
    for start, stop in spans:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def idle_gaps(events: list[dict], threshold_us: float = 50.0) -> dict:
    """The device's idle time between its kernels: all of it, and the gaps over `threshold_us`
    (those between steps, where the device waits for the host; gaps inside a step are a few us)."""
    ordered = sorted(events, key=lambda e: float(e["ts"]))
    gaps, end, after = [], float(ordered[0]["ts"]) + float(ordered[0]["dur"]), []
    for e in ordered[1:]:
        start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if start > end:
            gaps.append(start - end)
            after.append(kernel_family(e["name"]))
        end = max(end, stop)
    g = np.asarray(gaps or [0.0])
    big = g > threshold_us
    # Which kernel the device waited for (the first of a forward, of the sampler, ...): idle per name.
    waited: dict[str, float] = defaultdict(float)
    for gap, name, is_big in zip(gaps, after, big, strict=True):
        if is_big:
            waited[name] += gap / 1e3
    return {"idle_ms": round(float(g.sum()) / 1e3, 2), f"gaps_over_{threshold_us:g}us": int(big.sum()),
            f"idle_in_gaps_over_{threshold_us:g}us_ms": round(float(g[big].sum()) / 1e3, 2),
            "gap_p50_p90_p99_max_us": ([round(float(x), 1) for x in np.percentile(g[big], [50, 90, 99, 100])]
                                       if big.any() else []),
            "idle_ms_before": {k: round(v, 2) for k, v in sorted(waited.items(), key=lambda kv: -kv[1])[:6]}}


def kernel_family(name: str) -> str:
    """Group kernel names: strip numeric suffixes (fusion.123 -> fusion)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"\.\d+", "", name))[:80]


def summarize(events: list[dict], steps: int) -> dict:
    dev = device_events(events)
    if not dev:
        return {"device_events": 0}
    start = min(float(e["ts"]) for e in dev)
    stop = max(float(e["ts"]) + float(e["dur"]) for e in dev)
    busy = busy_us(dev)
    by_name: dict[str, float] = defaultdict(float)
    for e in dev:
        by_name[kernel_family(e["name"])] += float(e["dur"])
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "device_events": len(dev),
        "span_ms": round((stop - start) / 1e3, 2),
        "busy_ms": round(busy / 1e3, 2),
        "busy_fraction": round(busy / max(stop - start, 1e-9), 3),
        "busy_ms_per_step": round(busy / 1e3 / max(steps, 1), 3),
        **idle_gaps(dev),
        "top_kernels_ms_per_step": {k: round(v / 1e3 / max(steps, 1), 3) for k, v in top},
    }


def profiled(log_dir: Path):
    """jax.profiler.trace without the Python tracer (on by default; it slows every host step) and with
    the lowest host tracing level, so the traced steps keep their untraced host timing."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level, options.host_tracer_level = 0, 1
    return jax.profiler.trace(str(log_dir), create_perfetto_trace=True, profiler_options=options)


def traced(llm, prompts, params, log_dir: Path, label: str, output_tokens: int | None = None) -> dict:
    """One `generate` under the profiler, summarised (and printed)."""
    wall, steps = generate_counting_steps(llm, prompts, params, profiled(log_dir))
    summary = {"steps": steps, "wall_s": round(wall, 2), "wall_ms_per_step": round(1000 * wall / max(steps, 1), 3)}
    if output_tokens is not None:
        summary["output_tokens_per_s"] = round(output_tokens / wall, 1)
    summary.update(summarize(load_trace(log_dir), steps))
    print(f"{label}:", json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--sharegpt", type=int, default=0, metavar="N",
                   help="also trace the offline sharegpt_like workload of N requests (bench.throughput's run)")
    p.add_argument("--out", default="/tmp/jaxllm-trace")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    llm = LLM(**llm_kwargs(args))
    vocab = llm.engine.vocab_size
    result: dict = {"scenarios": {}}
    for batch in args.batches:
        reqs = fold_into_vocab(workload.fixed(batch, args.input_len, args.output_len, seed=batch), vocab)
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm (and the prefill of these prompts is cached after)
        reqs = fold_into_vocab(workload.fixed(batch, args.input_len, args.output_len, seed=batch + 1), vocab)
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        result["scenarios"][f"batch {batch}"] = traced(llm, prompts, params, Path(args.out) / f"batch{batch}",
                                                       f"batch {batch}")
    if args.sharegpt:
        reqs = requests_for("sharegpt_like", args.sharegpt, vocab_size=vocab)
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for _, n in reqs]
        label = f"sharegpt_like {args.sharegpt}"
        result["scenarios"][label] = traced(llm, prompts, params, Path(args.out) / "sharegpt", label,
                                            output_tokens=sum(n for _, n in reqs))
    write_json(result, args.output_json)
    return result


if __name__ == "__main__":
    main()
