"""Host time of one decode step's dispatch, piece by piece (the runner's calls, outside the engine).

    python -m bench.dispatch_cost --model bench/configs/llama-3.1-8b --load-format dummy --dtype bfloat16

Times, per call, on the host: the step's metadata `device_put` (a dozen arrays, and one packed
int32 array), the compiled forward's dispatch with fresh input buffers every call, with the same
buffers every call, and through `StableInputs` as the runner puts them (with and without a fresh
previous-tokens buffer, as the sampler leaves one every step), and the sampler's dispatch; then
the device time of a step. The programs are the runner's own (`runner.compiler`). With XLA
command buffers (CUDA graphs), a dispatch whose inputs moved must update the recorded graphs: the
fresh-against-same difference is that cost.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from bench.common import add_engine_args, add_model_args, llm_kwargs, write_json
from jaxllm import LLM
from jaxllm.runner.sampler import SamplerFlags, SamplingBatch
from jaxllm.runner.step_inputs import ForwardInputs, StableInputs


def _host_arrays(runner, num_tokens: int) -> ForwardInputs:
    """A decode step of `num_tokens` requests at position 100 (the padding of a real step)."""
    num_slots = runner.buckets.slots(num_tokens)
    pages = runner.buckets.pages[0]
    return ForwardInputs(
        input_ids=np.zeros(num_tokens, np.int32),
        positions=np.full(num_tokens, 100, np.int32),
        slot_mapping=np.full(num_tokens, runner.input_batch.null_slot, np.int32),  # writes dropped
        cu_q_lens=np.arange(num_slots + 1, dtype=np.int32),
        kv_lens=np.full(num_slots, 101, np.int32),
        page_indices=np.tile(np.arange(pages, dtype=np.int32), (num_slots, 1)),
        num_seqs=np.array([num_slots], np.int32),
        logits_indices=np.arange(num_slots, dtype=np.int32),
        placeholder_rows=np.full(num_tokens, -1, np.int32),
    )


def _per_call_ms(fn, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e3


def measure(runner, num_tokens: int, iterations: int) -> dict:
    rep = runner.compiler.sharding
    host = _host_arrays(runner, num_tokens)
    num_slots = runner.buckets.slots(num_tokens)
    sampling = SamplingBatch(np.ones(num_slots, np.float32), np.arange(num_slots, dtype=np.uint32),
                             np.full(num_slots, 101, np.int32))
    forward = runner.compiler.forward(num_tokens, runner.buckets.pages[0])
    sampler = runner.compiler.sampler(num_slots, SamplerFlags(all_greedy=False))
    stable = StableInputs(rep)
    zeros = np.zeros(runner.buckets.max_num_seqs, np.int32)
    out: dict = {"num_tokens": num_tokens}

    out["device_put_ms"] = _per_call_ms(lambda: jax.device_put((host, sampling), rep), iterations)
    packed = np.concatenate([np.ravel(a) for a in host])
    out["device_put_packed_ms"] = _per_call_ms(lambda: jax.device_put(packed, rep), iterations)

    state = {"logits": None, "prev_tokens": jax.device_put(zeros, rep)}

    def call(dev: ForwardInputs):
        runner.kv_pages, state["logits"] = forward(runner.model.leaves, runner.kv_pages, dev.batch(),
                                                   dev.placeholder_rows, state["prev_tokens"])

    def timed_calls(inputs: str, fresh_prev_tokens: bool = False) -> float:
        """Host ms per forward dispatch; inputs: "fresh" (a device_put per call), "same" (one
        set for every call) or "stable" (through StableInputs, as the runner puts them; the put timed apart)."""
        same = jax.device_put(host, rep)
        total = put = 0.0
        for i in range(iterations):
            t = time.perf_counter()
            dev = {"fresh": lambda: jax.device_put(host, rep), "same": lambda: same,
                   "stable": lambda: stable.put(host)[0]}[inputs]()
            put += time.perf_counter() - t
            if fresh_prev_tokens:
                state["prev_tokens"] = jax.device_put(zeros, rep)
            jax.block_until_ready((dev, state["prev_tokens"]))
            t = time.perf_counter()
            call(dev)
            total += time.perf_counter() - t
            if i % 8 == 7:  # keep the queue short: host time, not back-pressure, is measured
                jax.block_until_ready(state["logits"])
        jax.block_until_ready(state["logits"])
        if inputs == "stable":
            out["stable_put_ms"] = put / iterations * 1e3
        return total / iterations * 1e3

    timed_calls("fresh")  # warm
    out["forward_dispatch_fresh_inputs_ms"] = timed_calls("fresh")
    out["forward_dispatch_same_inputs_ms"] = timed_calls("same")
    out["forward_dispatch_stable_inputs_ms"] = timed_calls("stable")
    out["forward_dispatch_stable_inputs_fresh_prev_tokens_ms"] = timed_calls("stable", fresh_prev_tokens=True)

    dev_sampling = jax.device_put(sampling, rep)
    jax.block_until_ready(sampler(state["logits"], dev_sampling))
    total = 0.0
    for _ in range(iterations):
        t = time.perf_counter()
        tokens, _ = sampler(state["logits"], dev_sampling)
        total += time.perf_counter() - t
        jax.block_until_ready(tokens)
    out["sampler_dispatch_ms"] = total / iterations * 1e3

    dev = jax.device_put(host, rep)
    start = time.perf_counter()
    for _ in range(iterations):
        call(dev)
    jax.block_until_ready(state["logits"])
    out["forward_device_ms"] = (time.perf_counter() - start) / iterations * 1e3
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--iterations", type=int, default=64)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    llm = LLM(**llm_kwargs(args))
    runner = llm.engine.runner
    result = {"rows": [measure(runner, t, args.iterations) for t in runner.buckets.tokens]}
    print(json.dumps(result, indent=1))
    write_json(result, args.output_json)
    return result


if __name__ == "__main__":
    main()
