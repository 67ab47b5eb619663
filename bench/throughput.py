"""Offline throughput through `LLM`, as vLLM's `benchmark_throughput`.

    python -m bench.throughput --model bench/configs/llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --max-model-len 4096 --dataset sharegpt_like --num-prompts 1000
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import time

import numpy as np

from bench.common import add_engine_args, add_model_args, llm_kwargs, requests_for, write_json
from jaxllm import LLM, SamplingParams


def _instrument(llm: LLM) -> dict:
    """Where the step time goes: host work in runner.execute (batch build + dispatch), waiting for
    the device in result(), and the rest of engine.step (schedule, detokenize, stops)."""
    timings = {"steps": 0, "engine_step_s": 0.0, "runner_execute_s": 0.0, "wait_result_s": 0.0, "tokens": 0}
    engine, runner = llm.engine, llm.engine.runner
    execute, step = runner.execute, engine.step

    def timed_execute(sched):
        t = time.perf_counter()
        handle = execute(sched)
        timings["runner_execute_s"] += time.perf_counter() - t
        timings["tokens"] += sched.total_num_scheduled_tokens
        result = handle.result

        def timed_result():
            t = time.perf_counter()
            out = result()
            timings["wait_result_s"] += time.perf_counter() - t
            return out

        handle.result = timed_result
        return handle

    def timed_step():
        t = time.perf_counter()
        out = step()
        timings["engine_step_s"] += time.perf_counter() - t
        timings["steps"] += 1
        return out

    runner.execute, engine.step = timed_execute, timed_step
    return timings


def _debug_steps(llm: LLM, out_dir: str | None) -> None:
    """Every step synchronous and logged with its bucket and attention plan before it runs; the
    arrays of the step in flight are saved (steps.npz), so a device fault points at one batch."""
    from pallas_kernels.ragged_paged_attention.mosaic_gpu import default_plan

    runner = llm.engine.runner
    arch = runner.model.arch
    execute, build = runner.execute, runner.input_batch.build
    step_no = 0

    def plan(num_tokens, num_slots, pages_per_seq):
        return default_plan(num_tokens=num_tokens, num_slots=num_slots, num_kv_heads=arch.num_kv_heads,
                            max_kv_len=pages_per_seq * runner.page_size, group=arch.num_heads // arch.num_kv_heads,
                            page_size=runner.page_size, head_dim=arch.head_dim)

    def logged_build(sched, num_tokens, num_slots, pages_per_seq):
        arrays = build(sched, num_tokens, num_slots, pages_per_seq)
        q_lens = np.diff(arrays.cu_q_lens)[: int(arrays.num_seqs[0])]
        print(f"step {step_no}: T={num_tokens} S={num_slots} P={pages_per_seq} live={len(q_lens)} "
              f"tokens={int(q_lens.sum())} max_q={int(q_lens.max(initial=0))} "
              f"max_kv={int(arrays.kv_lens.max(initial=0))} plan={plan(num_tokens, num_slots, pages_per_seq)}",
              flush=True)
        if out_dir:
            np.savez(os.path.join(out_dir, "steps.npz"), cu_q_lens=arrays.cu_q_lens, kv_lens=arrays.kv_lens,
                     page_indices=arrays.page_indices, num_seqs=arrays.num_seqs, num_tokens=num_tokens)
        return arrays

    def synchronous(sched):
        nonlocal step_no
        handle = execute(sched)
        handle.result()
        step_no += 1
        return handle

    runner.input_batch.build, runner.execute = logged_build, synchronous


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dataset", default="sharegpt_like", choices=["sharegpt_like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    add_engine_args(p)
    p.add_argument("--output-json")
    p.add_argument("--debug-steps", action="store_true", help="block on every step and log its shapes")
    p.add_argument("--profile", action="store_true", help="cProfile the run; print the top functions")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("jaxllm.runner").setLevel(logging.DEBUG)

    t0 = time.perf_counter()
    llm = LLM(**llm_kwargs(args))
    startup_s = time.perf_counter() - t0
    reqs = requests_for(args.dataset, args.num_prompts, args.input_len, args.output_len, llm.engine.vocab_size)
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for _, n in reqs]
    timings = _instrument(llm)
    if args.debug_steps:
        _debug_steps(llm, os.path.dirname(args.output_json or "") or None)
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(ids) for ids, _ in reqs)
    assert out_tokens == sum(n for _, n in reqs), "every request must produce exactly its max_tokens"
    result = {
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "elapsed_s": round(elapsed, 2),
        "startup_s": round(startup_s, 1),
        "requests_per_s": round(len(reqs) / elapsed, 2),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 1),
        "mean_input": float(np.mean([len(i) for i, _ in reqs])),
        "mean_output": float(np.mean([n for _, n in reqs])),
        "config": {k: v for k, v in vars(args).items() if k != "output_json"},
        "attention": llm.engine.runner.attention_name,
        "max_num_seqs": llm.engine.limits.max_num_seqs,
        "max_num_batched_tokens": llm.engine.limits.max_num_batched_tokens,
        "num_pages": llm.engine.limits.num_pages,
        "step_profile": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
    }
    print(json.dumps(result, indent=1))
    write_json(result, args.output_json)
    return result


if __name__ == "__main__":
    main()
