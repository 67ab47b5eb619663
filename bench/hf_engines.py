"""HF transformers as a baseline engine for bench.hf_compare: continuous batching (the manager behind
`generate_batch`, one request per workload entry with its own max_new_tokens) and static `generate`
over padded batches. Random weights from the config, greedy, EOS ignored; each run stops at a time
budget and then reports the tokens done in that time (`truncated`: true)."""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

Requests = list[tuple[list[int], int]]


def load_random_model(model_dir: str, device: str, dtype: torch.dtype) -> Any:
    """The config's architecture with random weights, created directly on `device`."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # EOS ignored: nothing ends a request before its length
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _result(engine: str, t_done: int, t_want: int, elapsed: float, **extra: Any) -> dict:
    return {"engine": engine, "output_tokens": t_done, "requested_output_tokens": t_want,
            "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(t_done / elapsed, 1) if elapsed else 0.0,
            "truncated": t_done < t_want, **extra}


def _cb_config(reqs: Requests, device: str, num_blocks: int | None, max_batch_tokens: int | None) -> Any:
    """HF sizes its paged cache from free GPU memory; on CPU (where 5.17 sizes it from host RAM) or when
    asked, the number of blocks is given: enough for every request at once."""
    cls = getattr(transformers, "ContinuousBatchingConfig", None)
    if cls is None:
        return None
    kwargs: dict[str, int] = {}
    if num_blocks is None and not device.startswith("cuda"):
        block = getattr(cls(), "page_size", None) or getattr(cls(), "block_size", None) or 256
        num_blocks = sum(math.ceil((len(ids) + n) / block) for ids, n in reqs) + 1
        max_batch_tokens = max_batch_tokens or 256
    if num_blocks is not None:
        kwargs["num_blocks"] = num_blocks
    if max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = max_batch_tokens
    return cls(**kwargs)


def _cb_context_kwargs(model: Any, reqs: Requests, cb_config: Any) -> dict:
    params = inspect.signature(model.continuous_batching_context_manager).parameters
    kwargs: dict[str, Any] = {"block": True, "timeout": 60}
    if cb_config is not None and "continuous_batching_config" in params:
        kwargs["continuous_batching_config"] = cb_config
    if "workload_hints" in params:  # as generate_batch sizes the manager
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(len(i) for i, _ in reqs),
                                                 max_generated_length=max(n for _, n in reqs), num_requests=len(reqs))
    return kwargs


def run_continuous_batching(model: Any, reqs: Requests, max_seconds: float, device: str,
                            num_blocks: int | None = None, max_batch_tokens: int | None = None) -> dict:
    """All requests queued at once; tokens counted from the finished (and, after a timeout, the failed
    partial) outputs; warmup (CUDA graph capture) timed apart."""
    if not (hasattr(model, "generate_batch") and hasattr(model, "continuous_batching_context_manager")):
        raise RuntimeError(f"transformers {transformers.__version__} has no continuous batching "
                           "(generate_batch / continuous_batching_context_manager): 5.x is needed")
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in reqs), eos_token_id=None, pad_token_id=0)
    kwargs = _cb_context_kwargs(model, reqs, _cb_config(reqs, device, num_blocks, max_batch_tokens))
    want = sum(n for _, n in reqs)
    outputs: dict[str, Any] = {}
    t0 = time.perf_counter()
    with torch.no_grad(), model.continuous_batching_context_manager(generation_config=gen, **kwargs) as manager:
        warmup_s = time.perf_counter() - t0
        attn = model.config._attn_implementation  # CB switches it (paged/flash) until the manager stops
        start = time.perf_counter()
        for i, (ids, n) in enumerate(reqs):
            if manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1) is None:
                raise RuntimeError(f"HF continuous batching refused request {i}")
        deadline = start + max_seconds
        while len(outputs) < len(reqs) and time.perf_counter() < deadline:
            out = manager.get_result(timeout=min(1.0, max(deadline - time.perf_counter(), 0.01)))
            if out is not None and out.is_finished():
                outputs[out.request_id] = out
            elif out is None and not manager.is_running():
                raise RuntimeError("HF continuous batching: the generation thread stopped")
        if len(outputs) < len(reqs):  # over budget: stop now, collect the partial outputs of the rest
            manager.stop(block=True, timeout=60, hard_stop=True)
            while (out := manager.get_result(timeout=0.1)) is not None:
                outputs.setdefault(out.request_id, out)
        elapsed = time.perf_counter() - start
    done = sum(len(o.generated_tokens) for o in outputs.values())
    lengths = {f"r{i}": n for i, (_, n) in enumerate(reqs)}
    finished = [k for k, o in outputs.items() if o.error is None and len(o.generated_tokens) == lengths[k]]
    return _result("hf_continuous_batching", done, want, elapsed, warmup_s=round(warmup_s, 2),
                   completed_requests=len(finished), attn_implementation=attn)


def run_static(model: Any, reqs: Requests, max_seconds: float, device: str, batch_size: int) -> dict:
    """`generate` on consecutive batches of the workload in its order (as vLLM's HF backend), left
    padded, each run to its longest request: a request's tokens beyond its own length are padding
    work, not counted. `max_time` stops a batch at the budget."""
    def generate(batch: Requests, max_time: float | None) -> int:
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        gen = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in batch), eos_token_id=None,
                               pad_token_id=0, max_time=max_time)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        _sync(device)
        return out.shape[1] - width

    with torch.no_grad():
        t0 = time.perf_counter()
        generate([(p[:8], 2) for p, _ in reqs[:2]], None)  # warmup: first kernels, allocator
        warmup_s = time.perf_counter() - t0
        done, padded, completed, start = 0, 0, 0, time.perf_counter()
        for b in range(0, len(reqs), batch_size):
            left = max_seconds - (time.perf_counter() - start)
            if left <= 0:
                break
            batch = reqs[b: b + batch_size]
            steps = generate(batch, left)
            done += sum(min(n, steps) for _, n in batch)
            completed += sum(steps >= n for _, n in batch)
            padded += steps * len(batch)
        elapsed = time.perf_counter() - start
    return _result("hf_static_generate", done, sum(n for _, n in reqs), elapsed, warmup_s=round(warmup_s, 2),
                   completed_requests=completed, batch_size=batch_size, generated_tokens_incl_padding=padded,
                   attn_implementation=model.config._attn_implementation)
