"""The model runner: the only code that touches devices.

Be paranoid about adding lines here: everything per step is on the hot path.

One step: pad the scheduled work to a precompiled bucket (T tokens, S = min(T, max_num_seqs)
request slots, P pages per slot), ship the metadata in one transfer into buffers that keep their
addresses from step to step (`step_inputs`: CUDA graphs replay unchanged), run the jitted forward with
the KV pages donated, sample on device, and start copying the tokens back while the host goes
on to prepare the next step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxllm.config import EngineConfig, EngineLimits, scheduler_defaults
from jaxllm.engine.interfaces import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from jaxllm.models.batch import ForwardBatch
from jaxllm.runner import kv_cache
from jaxllm.runner.attention import select_attention
from jaxllm.runner.input_batch import InputBatch, SamplerNeeds, StepArrays, sampler_flags, sampling_arrays
from jaxllm.runner.model_loading import LoadedModel, load_model
from jaxllm.runner.sampler import SamplerFlags, SamplingBatch, sample
from jaxllm.runner.step_inputs import StableInputs
from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

# Sampler variants compiled at warmup: greedy and temperature-only batches, each also with grammar
# bitmasks (structured outputs), and the variant of the default sampling params; rarer options
# (top-k/p, penalties, biases, logprobs) compile on use.
_WARM_SAMPLERS = tuple(
    SamplerFlags(all_greedy=greedy, bitmask=bitmask) for greedy in (True, False) for bitmask in (False, True)
)


def _split_tables(batch: SamplingBatch) -> tuple[SamplingBatch, dict[str, np.ndarray]]:
    """(batch with its per-row columns only, {field: [S, X] table}).

    NOTE: the tables stay out of the stable buffers: they feed only the sampler, whose dispatch is
    cheap, and one kept per bucket would hold gigabytes (token histories at long max_model_len)."""
    tables = {f.name: v for f in dataclasses.fields(batch) if (v := getattr(batch, f.name)) is not None and v.ndim > 1}
    return dataclasses.replace(batch, **dict.fromkeys(tables)), tables


def _warm_sampler_flags(default_sampling: SamplingParams | None) -> list[SamplerFlags]:
    """_WARM_SAMPLERS and the variants of batches of requests that keep some of the default
    sampling params: its penalties and biases with greedy batches, and with sampled ones with
    and without its top-k/p; each with and without bitmasks.

    NOTE: a model's generation config often makes top-p the default (Llama-3 instruct: temperature
    0.6, top_p 0.9); compiled on use, that variant cost the first request ~3 s on an H200, and as
    much again at each new batch size. The server fills each unset field from the defaults, so a
    request with temperature=0 or top_p=1 keeps the rest (a repetition penalty, say)."""
    out = list(_WARM_SAMPLERS)
    if default_sampling is None:
        return out
    needs = SamplerNeeds.of(default_sampling)
    kinds = [(True, False), (False, False), (False, needs.top_k_top_p)]  # (all greedy, top-k/p)
    for greedy, top in kinds:
        for bitmask in (False, True):
            flags = SamplerFlags(all_greedy=greedy, top_k_top_p=top, penalties=needs.penalties,
                                 sparse_bias=needs.bias, bitmask=bitmask)
            if flags not in out:
                out.append(flags)
    return out


def token_buckets(max_tokens: int, max_num_seqs: int = 0, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to the step budget (which is always a bucket), and every
    multiple of 128 between 256 and min(1024, max_num_seqs).

    NOTE: an 8B decode step is bound by its weights' read below ~200 tokens and by its matmuls
    above, where padding costs its share; decode-only batches (at most max_num_seqs tokens) land
    anywhere in 256-1024 as requests finish, and a power-of-two bucket pads them by 25% on
    average (9% with these; 4% faster modeled on the sharegpt_like workload). Prefill chunks fill
    the step budget, so larger buckets stay powers of two."""
    out, b = [], smallest
    while b < max_tokens:
        out.append(b)
        b *= 2
    out += range(256 + 128, min(1024, max_num_seqs, max_tokens), 128)
    return sorted({*out, max_tokens})


def page_buckets(max_pages: int, count: int = 2, ratio: int = 4) -> list[int]:
    """A few pages-per-request widths: max_pages, max_pages / 4, ... (at least 4 pages).

    NOTE: the longest request of a busy batch usually needs the widest bucket anyway, so narrow
    ones only pay off for small batches (latency); two keep the compile count down."""
    out = [max_pages]
    while len(out) < count and out[-1] // ratio >= 4:
        out.append(out[-1] // ratio)
    return sorted(out)


def setup_compilation_cache(path: str | None) -> None:
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@dataclass
class _Step:
    """What a dispatched step left for the host to read back."""

    arrays: StepArrays
    tokens: jax.Array | None  # [max_num_seqs] i32, rows beyond S are padding; None until sampled
    logprobs: tuple | None
    prompt_logprobs: tuple | None
    # Set while the sampling waits for grammar bitmasks (StepHandle.sample).
    pending: _PendingSample | None = None


@dataclass
class _PendingSample:
    logits: jax.Array  # [S, V] f32, on device
    sampling: SamplingBatch  # numpy, its bitmask rows all ones until sample()
    flags: SamplerFlags


class StepHandle:
    def __init__(self, runner: ModelRunner, step: _Step | None):
        self._runner = runner
        self._step = step
        self._result: ModelRunnerOutput | None = None

    def sample(self, grammar_bitmask: dict[str, np.ndarray]) -> None:
        self._runner._sample_pending(self._step, grammar_bitmask)

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._runner._finish(self._step)
        return self._result


class ModelRunner:
    def __init__(self, config: EngineConfig, *, served: bool = False, devices=None,
                 default_sampling: SamplingParams | None = None):
        """default_sampling: what a request gets when it sets nothing (the model's generation
        config), whose sampler variant is then compiled at warmup too."""
        setup_compilation_cache(config.compilation_cache_dir)
        self.model: LoadedModel = load_model(config.model, config.parallel, devices)
        arch, mesh = self.model.arch, self.model.mesh
        device = mesh.local_devices[0]  # one this process holds (multi-process: memory stats, defaults)
        self.platform = device.platform
        self.vocab_size = arch.vocab_size
        self.max_model_len = self._resolve_max_model_len(config)
        self.config = config
        self.max_num_seqs, max_num_batched_tokens, buckets, async_scheduling = self._resolve_scheduler(
            config, device, served)
        self.page_size = config.cache.block_size
        self.token_buckets = buckets
        max_pages = -(-self.max_model_len // self.page_size)
        self.attention, self.attention_name = select_attention(
            config.model.attention_backend, arch, self.model.dtype, self.page_size, mesh, self.model.rules
        )
        # NOTE: the Mosaic kernel reads only the pages a request's kv_len covers, whatever the
        # table's width, so one width halves the buckets to compile (and the start-up); the wide
        # table costs only its host->device copy, [S, max_pages] i32 per step, kept small here.
        one_width = self.attention_name == "pallas" and max_pages <= _ONE_PAGE_WIDTH_UP_TO
        self.page_buckets = [max_pages] if one_width else page_buckets(max_pages)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._inputs = StableInputs(self._replicated)
        self._forward = jax.jit(self.model.forward_fn(self.attention), donate_argnums=(1,))
        self._compiled: dict[tuple, Any] = {}
        self._warm = False

        tp, rules, dtype = mesh.devices.size, self.model.rules, self.model.dtype
        page_bytes = kv_cache.bytes_per_page(arch, self.page_size, dtype, tp, rules)
        activation = 0
        if kv_cache.device_memory(device) is not None:
            activation = self._activation_bytes(config.compilation_cache_dir)
        # The step inputs' buffers stay allocated, one set per bucket (step_inputs.StableInputs).
        self._bucket_keys = [(t, p) for t in self.token_buckets for p in self.page_buckets]
        inputs = sum(a.nbytes for key in self._bucket_keys for a in self._placeholder_host(*key))
        budget = kv_cache.kv_budget_bytes(config.cache, device, activation + inputs, _device_total_bytes(device))
        num_pages = _same_on_every_process(kv_cache.num_pages_for(config.cache, budget, page_bytes))
        kv_cache.check_fits(num_pages, self.page_size, self.max_model_len, page_bytes, budget)
        kv_cache.log_pool(num_pages, self.page_size, self.max_model_len, page_bytes)
        self.limits = EngineLimits(
            max_model_len=self.max_model_len, block_size=self.page_size, num_pages=num_pages,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            token_buckets=tuple(buckets), async_scheduling=async_scheduling,
        )
        self.num_pages = num_pages
        self.kv_pages = kv_cache.allocate_kv_pages(arch, num_pages, self.page_size, dtype, mesh, rules)
        self.input_batch = InputBatch(self.page_size, num_pages, config.model.seed, max_pages, self.max_num_seqs)
        self._prev_tokens = jax.device_put(np.zeros(self.max_num_seqs, np.int32), self._replicated)
        self._warm_sampler_flags = _warm_sampler_flags(default_sampling)
        self._loader: ThreadPoolExecutor | None = None
        self._deferred: list[tuple[int, tuple, Callable[[], Any]]] = []  # warmup jobs left to the loader
        # NOTE: served, a single process starts serving once its smallest bucket is ready and loads
        # the rest behind it; offline runs and multi-process runs wait for every bucket.
        self._warmup(background=served and jax.process_count() == 1)

    # ----- startup -------------------------------------------------------------------------

    def _resolve_max_model_len(self, config: EngineConfig) -> int:
        derived = self.model.arch.max_position_embeddings
        wanted = config.model.max_model_len
        if wanted is None:
            return derived
        if wanted > derived:
            raise ValueError(
                f"max_model_len ({wanted}) is greater than the derived max_model_len (max_position_embeddings="
                f"{derived} in the model's config.json)."
            )
        return wanted

    def _resolve_scheduler(self, config: EngineConfig, device, served: bool) -> tuple[int, int, list[int], bool]:
        """(max_num_seqs, max_num_batched_tokens, token buckets, async_scheduling) for this device."""
        sched = config.scheduler
        default_seqs, default_tokens = scheduler_defaults(self.platform, _device_total_bytes(device), served)
        max_num_seqs = sched.max_num_seqs or default_seqs
        max_tokens = sched.max_num_batched_tokens or max(default_tokens, 16)
        buckets = sorted(set(sched.token_buckets)) or token_buckets(max_tokens, max_num_seqs)
        if buckets[-1] < max_tokens:
            buckets.append(max_tokens)
        async_scheduling = sched.async_scheduling
        if async_scheduling is None:
            async_scheduling = self.platform != "cpu" or self.model.mesh.devices.size == 1
        return max_num_seqs, max_tokens, buckets, async_scheduling

    def _abstract_args(self, num_tokens: int, pages_per_seq: int, num_pages: int | None = None):
        num_slots = min(num_tokens, self.max_num_seqs)
        rep = self._replicated
        i32 = partial(jax.ShapeDtypeStruct, dtype=jnp.int32, sharding=rep)
        batch = ForwardBatch(
            input_ids=i32((num_tokens,)),
            positions=i32((num_tokens,)),
            slot_mapping=i32((num_tokens,)),
            cu_q_lens=i32((num_slots + 1,)),
            kv_lens=i32((num_slots,)),
            page_indices=i32((num_slots, pages_per_seq)),
            num_seqs=i32((1,)),
            logits_indices=i32((num_slots,)),
        )
        leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in self.model.leaves]
        if num_pages is None:
            kv = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in self.kv_pages]
        else:
            from jaxllm.models.llama import kv_pages_shape
            from jaxllm.models.sharding import kv_pages_sharding

            shape = kv_pages_shape(self.model.arch, num_pages, self.page_size)
            sharding = kv_pages_sharding(self.model.mesh, self.model.rules)
            kv = [jax.ShapeDtypeStruct(shape, self.model.dtype, sharding=sharding)] * self.model.arch.num_layers
        placeholder_rows = i32((num_tokens,))
        prev_tokens = i32((self.max_num_seqs,))
        return leaves, kv, batch, placeholder_rows, prev_tokens

    def _activation_bytes(self, cache_dir: str | None) -> int:
        """Temp memory of the largest bucket's forward, compiled against a small stand-in pool.

        NOTE: with a compilation cache the figure is kept beside it, keyed by the traced program
        (every shape, the kernel's body and its compiler params), the weights' shardings, jax's
        version and the device: a warm start then skips lowering that bucket and loading it from
        the cache (~3 s of the 8B config's warm start on an H200), only to read one number."""
        args = self._abstract_args(self.token_buckets[-1], self.page_buckets[-1], num_pages=self.page_buckets[-1] + 1)
        traced = self._forward.trace(*args)
        path = None
        if cache_dir:
            device = self.model.mesh.devices.flat[0]
            specs = [str(getattr(leaf.sharding, "spec", None)) for leaf in args[0]]
            key = "\n".join([str(traced.jaxpr), jax.__version__, jaxlib.__version__, device.device_kind,
                             device.client.platform_version, str(self.model.mesh.shape), *specs,
                             os.environ.get("XLA_FLAGS", "")])
            path = Path(cache_dir) / f"jaxllm-activation-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
            with contextlib.suppress(OSError, ValueError, KeyError):
                temp = int(json.loads(path.read_text())["temp_size_in_bytes"])
                logger.info("Activation peak of the largest bucket: %.2f GiB (from %s)", temp / kv_cache.GiB, path)
                return temp
        analysis = traced.lower().compile().memory_analysis()
        temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
        logger.info("Activation peak of the largest bucket: %.2f GiB", temp / kv_cache.GiB)
        if path is not None:
            with contextlib.suppress(OSError):
                scratch = path.with_suffix(f".{os.getpid()}.tmp")
                scratch.write_text(json.dumps({"temp_size_in_bytes": temp}))
                scratch.replace(path)
        return temp

    def _warmup(self, background: bool) -> None:
        """Compile (or load from the compilation cache) every bucket's forward, the common sampler
        variants and the input unpacking of both, smallest token bucket first.

        background: compile only the smallest token bucket's; `load_in_background` loads the others
        on a thread pool, and a step that needs one still loading waits for it (`_ready`).

        NOTE: the first served request waited for every bucket before (2026-12-04, H200, 8B config:
        73.5 s from launch to the first token with a warm compilation cache, 29 s of it loading 14
        buckets one after the other: tracing and lowering hold the GIL)."""
        start = time.perf_counter()
        jobs = self._warmup_jobs()
        first = [job for job in jobs if job[0] == jobs[0][0]]  # the smallest token bucket's
        # GPU compiles autotune on the device: a few at a time, or they slow each other down.
        workers = max(1, min(len(jobs), os.cpu_count() or 1, 4 if self.platform == "gpu" else 2))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="jaxllm-compile")
        pending = {key: pool.submit(fn) for _, key, fn in (first if background else jobs)}
        for key, future in tqdm(pending.items(), desc="Compiling buckets", unit="job", leave=False, disable=background):
            self._compiled[key] = future.result()
        self._warm = True
        self._deferred = jobs[len(first):] if background else []
        if not self._deferred:
            pool.shutdown()
            self._log_compiled(start)
            return
        self._loader = pool
        logger.info("Compiled the %d-token bucket in %.1f s; %d more jobs will load in the background",
                    jobs[0][0], time.perf_counter() - start, len(self._deferred))

    def load_in_background(self) -> None:
        """Start loading what a background warmup left (none offline). Called once the engine is
        built: the loaders hold the GIL for most of their time, and would slow the rest of the
        start-up threefold (the tokenizer's load took 5.4 s instead of 1.7 beside two of them on the
        CPU machine)."""
        if self._loader is None or not self._deferred:
            return
        start, futures = time.perf_counter(), []
        for _, key, fn in self._deferred:
            self._compiled[key] = future = self._loader.submit(fn)
            future.add_done_callback(partial(self._loaded, key))
            futures.append(future)
        self._deferred = []
        threading.Thread(target=lambda: (wait(futures), self._log_compiled(start)), daemon=True).start()

    def _warmup_jobs(self) -> list[tuple[int, tuple, Callable[[], Any]]]:
        """(token bucket, key in `_compiled`, job) for every forward bucket, each sampler variant
        compiled at warmup and each bucket's input unpacking, in token-bucket order."""
        jobs, samplers = [], set()
        for num_tokens, pages_per_seq in self._bucket_keys:
            key = ("forward", num_tokens, pages_per_seq)
            jobs.append((num_tokens, key, partial(self._compile_forward, num_tokens, pages_per_seq)))
            jobs.append((num_tokens, ("inputs", num_tokens, pages_per_seq),
                         partial(self._warm_inputs, num_tokens, pages_per_seq)))
            num_slots = min(num_tokens, self.max_num_seqs)
            for flags in self._warm_sampler_flags:
                if (num_slots, flags) not in samplers:
                    samplers.add((num_slots, flags))
                    jobs.append((num_tokens, ("sample", num_slots, flags),
                                 partial(self._build_sampler, num_slots, flags, True)))
        return sorted(jobs, key=lambda job: job[0])

    def _loaded(self, key: tuple, future: Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            logger.error("Loading %s in the background failed: %r", key, future.exception())
            return
        self._compiled[key] = future.result()

    def _log_compiled(self, start: float) -> None:
        logger.info(
            "Compiled %d forward buckets (tokens %s x pages/request %s) in %.1f s; attention: %s",
            len(self._bucket_keys), self.token_buckets, self.page_buckets, time.perf_counter() - start,
            self.attention_name,
        )

    def wait_warm(self) -> None:
        """Wait until every bucket loading in the background is ready (tests, benchmarks)."""
        for key in list(self._compiled):
            self._ready(key)

    def _placeholder_sampling(self, num_slots: int, flags: SamplerFlags) -> SamplingBatch:
        """Zeros shaped as `sampling_arrays` sends them for these flags (bias tables at their
        narrowest width)."""
        row = lambda dtype=np.int32: np.zeros(num_slots, dtype)  # noqa: E731
        table = lambda width, dtype=np.int32: np.zeros((num_slots, width), dtype)  # noqa: E731
        batch = SamplingBatch(row(np.float32), row(np.uint32), row())
        if flags.top_k_top_p:
            batch.top_k, batch.top_p, batch.min_p = row(), row(np.float32), row(np.float32)
        if flags.penalties:
            batch.presence_penalty, batch.frequency_penalty, batch.repetition_penalty = (row(np.float32),) * 3
            batch.output_tokens = batch.prompt_tokens = table(self.max_model_len)
        if flags.sparse_bias:
            batch.bias_ids, batch.bias_values, batch.allowed_only = table(16), table(16, np.float32), row(np.bool_)
        if flags.bitmask:
            batch.bitmask = table(-(-self.vocab_size // 32))
        return batch

    def _placeholder_host(self, num_tokens: int, pages_per_seq: int) -> tuple[np.ndarray, ...]:
        """Zeros shaped as the forward's host inputs of a bucket (the `host` tuple of `execute`)."""
        num_slots = min(num_tokens, self.max_num_seqs)
        zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        tokens, slots = zeros(num_tokens), zeros(num_slots)
        return (tokens, tokens, tokens, zeros(num_slots + 1), slots, zeros(num_slots, pages_per_seq), zeros(1),
                slots, tokens)

    def _warm_inputs(self, num_tokens: int, pages_per_seq: int) -> None:
        """Compile the input unpacking of a bucket's warm steps, as `execute` and `_sample_pending`
        ship them: with the sampling columns of a warm sampler, or without them and then the
        columns of a step with grammar bitmasks.

        NOTE: through buffers of its own, which it then drops: a loader thread must not donate the
        buffers of a step the engine thread is preparing. The compiled unpacking is shared."""
        scratch = StableInputs(self._replicated)
        num_slots = min(num_tokens, self.max_num_seqs)
        host = self._placeholder_host(num_tokens, pages_per_seq)
        scratch.put(host)
        for flags in self._warm_sampler_flags:
            columns, _ = _split_tables(self._placeholder_sampling(num_slots, flags))
            if flags.bitmask:
                scratch.put(columns)
            else:
                scratch.put(host, columns)

    def _compile_forward(self, num_tokens: int, pages_per_seq: int):
        start = time.perf_counter()
        compiled = self._forward.lower(*self._abstract_args(num_tokens, pages_per_seq)).compile()
        logger.debug("compiled bucket (%d tokens, %d pages) in %.1f s", num_tokens, pages_per_seq,
                     time.perf_counter() - start)
        return compiled

    def _compiled_forward(self, num_tokens: int, pages_per_seq: int):
        key = ("forward", num_tokens, pages_per_seq)
        fn = self._ready(key)
        if fn is None:
            self._warn_compile(key)
            fn = self._compiled[key] = self._compile_forward(num_tokens, pages_per_seq)
        return fn

    def _ready(self, key: tuple) -> Any:
        """What `_compiled` holds for `key`, once ready (a bucket loading in the background is
        waited for, with its input unpacking); None if it was never compiled."""
        fn = self._compiled.get(key)
        if isinstance(fn, Future) and fn.cancelled():  # shut down before it loaded
            return None
        if isinstance(fn, Future):
            fn = self._compiled[key] = fn.result()
            if key[0] == "forward":
                self._ready(("inputs", *key[1:]))
        return fn

    def _warn_compile(self, key: tuple) -> None:
        if self._warm:
            logger.warning("Compiling after warmup: %s (a bucket or variant missing from warmup)", key)

    def _sampler(self, num_slots: int, flags: SamplerFlags):
        """The sampling step for S rows and these flags. The common variants (greedy, and
        temperature-only) are compiled ahead at warmup; rarer ones compile on first use."""
        key = ("sample", num_slots, flags)
        fn = self._ready(key)
        if fn is None:
            self._warn_compile(key)
            fn = self._compiled[key] = self._build_sampler(num_slots, flags)
        return fn

    def _build_sampler(self, num_slots: int, flags: SamplerFlags, aot: bool = False):
        max_seqs = self.max_num_seqs

        def run(logits, batch):
            tokens, logprobs = sample(logits, batch, flags)
            padded = jnp.zeros(max_seqs, jnp.int32).at[: tokens.shape[0]].set(tokens)
            return padded, logprobs

        fn = jax.jit(run)
        if not aot:
            return fn
        rep = self._replicated
        logits = jax.ShapeDtypeStruct((num_slots, self.vocab_size), jnp.float32, sharding=rep)
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                             self._placeholder_sampling(num_slots, flags))
        return fn.lower(logits, batch).compile()

    # ----- one step ------------------------------------------------------------------------

    def execute(self, sched: SchedulerOutput) -> StepHandle:
        self.input_batch.update(sched)
        if sched.total_num_scheduled_tokens == 0:
            return StepHandle(self, None)
        num_tokens = next(b for b in self.token_buckets if b >= sched.total_num_scheduled_tokens)
        num_slots = min(num_tokens, self.max_num_seqs)
        longest = max(
            len(self.input_batch.requests[r].page_ids) for r in sched.num_scheduled_tokens
        )
        pages_per_seq = next(p for p in self.page_buckets if p >= longest)
        # Before the inputs go over: a bucket still loading (served start-up) is waited for here,
        # with its input unpacking.
        forward = self._compiled_forward(num_tokens, pages_per_seq)
        arrays = self.input_batch.build(sched, num_tokens, num_slots, pages_per_seq)
        states = [self.input_batch.requests[r] for r in arrays.req_ids]
        want_prompt_logprobs = bool(arrays.prompt_logprob_rows)
        flags = sampler_flags(states, bitmask_rows=bool(sched.structured_req_ids))
        sampling = sampling_arrays(arrays, states, num_slots, flags, {}, self.vocab_size, self.max_model_len)

        logits_indices = arrays.logits_indices
        if want_prompt_logprobs:  # every token's logits; rows for sampling picked afterwards
            logits_indices = np.arange(num_tokens, dtype=np.int32)
        host = (
            arrays.input_ids, arrays.positions, arrays.slot_mapping, arrays.cu_q_lens, arrays.kv_lens,
            arrays.page_indices, arrays.num_seqs, logits_indices, arrays.placeholder_rows,
        )
        if flags.bitmask:  # the sampling columns go with the masks, in sample()
            (dev,) = self._inputs.put(host)
        else:
            dev, sampling = self._put_sampling(sampling, host)
        batch = ForwardBatch(*dev[:8])
        args = (self.model.leaves, self.kv_pages, batch, dev[8], self._prev_tokens)
        if want_prompt_logprobs:  # rare: every token's logits, through the (lazily compiled) jit
            key = ("forward-all-logits", num_tokens, pages_per_seq)
            if key not in self._compiled:
                self._warn_compile(key)
                self._compiled[key] = self._forward
            self.kv_pages, all_logits = self._forward(*args)
            logits = all_logits[jnp.asarray(arrays.logits_indices)]
        else:
            self.kv_pages, logits = forward(*args)
        prompt_lp = None
        if want_prompt_logprobs:
            targets = np.zeros(num_tokens, np.int32)
            targets[:-1] = arrays.input_ids[1:]
            prompt_lp = _prompt_logprobs(all_logits, jnp.asarray(targets))
            jax.tree.map(lambda a: a.copy_to_host_async(), prompt_lp)
        self.input_batch.advance(sched, arrays)
        step = _Step(arrays, None, None, prompt_lp)
        if flags.bitmask:
            step.pending = _PendingSample(logits, sampling, flags)
        else:
            self._dispatch_sample(step, logits, sampling, flags)
        return StepHandle(self, step)

    def _sample_pending(self, step: _Step | None, grammar_bitmask: dict[str, np.ndarray]) -> None:
        """The sampling of a step with constrained requests, once their masks are known."""
        assert step is not None and step.pending is not None, "sample() on a step without constrained requests"
        pending, step.pending = step.pending, None
        mask = pending.sampling.bitmask  # [S, ceil(V / 32)] i32, all ones
        for i, req_id in enumerate(step.arrays.req_ids):
            row = grammar_bitmask.get(req_id)
            if row is not None:
                mask[i] = row
        (sampling,) = self._put_sampling(pending.sampling)
        self._dispatch_sample(step, pending.logits, sampling, pending.flags)

    def _put_sampling(self, sampling: SamplingBatch, *before: Any) -> tuple:
        """(*before, sampling) on the device: `before` and the per-row columns in one transfer
        into stable buffers, the [S, X] tables (token histories, biases, bitmasks) plainly."""
        columns, tables = _split_tables(sampling)
        *out, columns = self._inputs.put(*before, columns)
        if tables:
            columns = dataclasses.replace(columns, **jax.device_put(tables, self._replicated))
        return (*out, columns)

    def _dispatch_sample(self, step: _Step, logits: jax.Array, sampling: SamplingBatch, flags: SamplerFlags) -> None:
        num_slots = logits.shape[0]
        step.tokens, step.logprobs = self._sampler(num_slots, flags)(logits, sampling)
        self._prev_tokens = step.tokens  # the next step's decode inputs, without a host round trip
        for x in (step.tokens, step.logprobs):
            if x is not None:
                jax.tree.map(lambda a: a.copy_to_host_async(), x)

    def _finish(self, step: _Step | None) -> ModelRunnerOutput:
        if step is None:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        assert step.pending is None, "result() before sample() on a step with constrained requests"
        arrays = step.arrays
        tokens = np.asarray(step.tokens)
        rows = [i for i, s in enumerate(arrays.samples) if s]
        req_ids = [arrays.req_ids[i] for i in rows]
        self.input_batch.receive(req_ids, rows, tokens)
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if step.logprobs is not None:
            top_ids, top_vals, sampled_lp, rank = (np.asarray(x) for x in step.logprobs)
            for j, i in enumerate(rows):
                state = self.input_batch.requests.get(arrays.req_ids[i])
                k = state.sampling_params.logprobs if state is not None else None
                if k is None:
                    continue
                k = min(k, MAX_LOGPROBS)
                logprobs[j] = TokenLogprobs(
                    top_ids[i, :k].tolist(), top_vals[i, :k].tolist(), float(sampled_lp[i]), int(rank[i])
                )
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        if step.prompt_logprobs is not None:
            top_ids, top_vals, target_lp, rank = (np.asarray(x) for x in step.prompt_logprobs)
            for req_id, (lo, hi) in arrays.prompt_logprob_rows.items():
                state = self.input_batch.requests.get(req_id)
                if state is None:
                    continue
                k = min(state.sampling_params.prompt_logprobs, MAX_LOGPROBS)
                prompt_logprobs[req_id] = [
                    TokenLogprobs(top_ids[t, :k].tolist(), top_vals[t, :k].tolist(), float(target_lp[t]), int(rank[t]))
                    for t in range(lo, hi)
                ]
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=[int(tokens[i]) for i in rows],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def shutdown(self) -> None:
        """Cancel the buckets still queued to load (those loading finish): the process's exit
        would otherwise wait for all of them."""
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)


@jax.jit
def _prompt_logprobs(logits, targets):
    """logits [T, V] f32, targets [T] (token p + 1 for position p) -> top-k and the target's logprob/rank."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_values, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs > target[:, None], axis=-1) + 1
    return top_ids.astype(jnp.int32), top_values, target, rank.astype(jnp.int32)


# Widest page table (pages per request) sent whole every step with the Mosaic kernel: 8192 tokens
# at 16-token pages; longer contexts keep two widths.
_ONE_PAGE_WIDTH_UP_TO = 512


def _same_on_every_process(num_pages: int) -> int:
    """The smallest pool any process can hold: every process must run the same program on the
    same pool, and each measured its own free memory."""
    if jax.process_count() == 1:
        return num_pages
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(num_pages, np.int64))))


def _device_total_bytes(device) -> int | None:
    """Total device memory (for vLLM's default budgets and gpu_memory_utilization)."""
    mem = kv_cache.device_memory(device)
    if mem is None:
        return None
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    return int(mem[0] / fraction)
