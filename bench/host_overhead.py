"""Host overhead per step, CPU only: the scheduler, the runner's batch preparation and the
engine's output processing (detokenize, stops) for N running decodes, with no device at all.

    python -m bench.host_overhead --num-requests 256 --steps 200

(As a module: run as a script, bench/ goes first on sys.path and bench/kernels.py shadows the
`kernels` package that transformers imports.)

The runner here is the real host half of `ModelRunner.execute` (InputBatch.update/build, padding
to the bucket, sampler flags and sampling arrays, advance) with the device step replaced by
returning pre-drawn tokens, so the figure is what the device would wait for between steps if
the host were not overlapped with it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import model_dir_with_tokenizer
from jaxllm.build import freeze_startup_heap
from jaxllm.config import EngineConfig, EngineLimits
from jaxllm.engine.core import EngineInfo
from jaxllm.engine.interfaces import ModelRunnerOutput, SchedulerOutput
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.runner.compilation import page_buckets
from jaxllm.runner.input_batch import InputBatch, sampler_flags, sampling_arrays
from jaxllm.runner.limits import token_buckets
from jaxllm.runner.sampler import LogprobWidths
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.tokenizer import load_tokenizer


class HostOnlyRunner:
    def __init__(self, limits: EngineLimits, vocab_size: int, timings: dict):
        max_pages = -(-limits.max_model_len // limits.block_size)
        self.batch = InputBatch(limits.block_size, limits.num_pages, 0, max_pages, limits.max_num_seqs)
        self.token_buckets = token_buckets(limits.max_num_batched_tokens, limits.max_num_seqs)
        self.page_buckets = page_buckets(max_pages)
        self.max_num_seqs = limits.max_num_seqs
        self.vocab_size, self.max_model_len = vocab_size, limits.max_model_len
        self.logprob_widths = LogprobWidths.of(20, vocab_size)  # vLLM's default --max-logprobs
        self.rng = np.random.default_rng(0)
        self.timings = timings

    def execute(self, sched: SchedulerOutput):
        start = time.perf_counter()
        self.batch.update(sched)
        num_tokens = next(b for b in self.token_buckets if b >= sched.total_num_scheduled_tokens)
        num_slots = min(num_tokens, self.max_num_seqs)
        longest = max(len(self.batch.requests[r].page_ids) for r in sched.num_scheduled_tokens)
        pages = next(p for p in self.page_buckets if p >= longest)
        arrays = self.batch.build(sched, num_tokens, num_slots, pages)
        states = [self.batch.requests[r] for r in arrays.req_ids]
        flags = sampler_flags(states, bool(sched.structured_req_ids), self.logprob_widths)
        sampling_arrays(arrays, states, num_slots, flags, {}, self.vocab_size, self.max_model_len)
        self.batch.advance(sched, arrays)
        tokens = self.rng.integers(1000, 100000, num_slots)
        rows = [i for i, s in enumerate(arrays.samples) if s]
        self.timings["runner_host_s"] += time.perf_counter() - start
        batch = self.batch

        class Handle:
            def result(self):
                req_ids = [arrays.req_ids[i] for i in rows]
                batch.receive(req_ids, rows, tokens)
                return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[int(tokens[i]) for i in rows])

        return Handle()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=4096)
    args = p.parse_args(argv)
    config = EngineConfig.from_kwargs(max_num_seqs=args.num_requests, max_num_batched_tokens=8192,
                                      async_scheduling=True)
    limits = EngineLimits.given(config, max_model_len=args.max_model_len,
                                num_pages=args.num_requests * (args.max_model_len // 16))
    tokenizer = load_tokenizer(model_dir_with_tokenizer("bench/configs/llama-3.1-8b"))
    timings = {"runner_host_s": 0.0}
    runner = HostOnlyRunner(limits, 128256, timings)
    engine = LLMEngine(config, limits, runner, tokenizer, 128256, [128001], log_stats=False)
    freeze_startup_heap()  # as build_engine does
    schedule = engine.scheduler.schedule
    timings["schedule_s"] = 0.0

    def timed_schedule():
        t = time.perf_counter()
        out = schedule()
        timings["schedule_s"] += time.perf_counter() - t
        return out

    engine.scheduler.schedule = timed_schedule
    rng = np.random.default_rng(1)
    info = EngineInfo.describe(engine)
    params = SamplingParams(temperature=0.8, max_tokens=args.max_model_len - args.prompt_len, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)  # as LLM.generate
    for i in range(args.num_requests):
        engine.add_request(info.new_request(str(i), rng.integers(1000, 100000, args.prompt_len).tolist(), params))

    def prefilling() -> bool:
        return bool(engine.scheduler.waiting) or any(
            r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running
        )

    while prefilling():
        engine.step()  # prefill everything first
    for key in timings:
        timings[key] = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    total = time.perf_counter() - start
    per_step = {k: round(1000 * v / args.steps, 3) for k, v in timings.items()}
    result = {"running_requests": args.num_requests, "steps": args.steps,
              "engine_step_ms": round(1000 * total / args.steps, 3),
              "schedule_ms": per_step["schedule_s"], "runner_host_ms": per_step["runner_host_s"],
              "engine_update_and_detokenize_ms": round(1000 * total / args.steps - per_step["schedule_s"]
                                                       - per_step["runner_host_s"], 3)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
