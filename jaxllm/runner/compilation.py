"""The step's programs compiled ahead: buckets, the persistent cache, warm-up and background loading.

Every step is padded to a bucket: T tokens (`EngineLimits.token_buckets`), S = min(T,
max_num_seqs) request slots and P pages per slot (`Buckets`). At start-up every bucket's forward
and input unpacking, and the common sampler variants, are compiled or loaded from the persistent
compilation cache, smallest bucket first; a compile after that is logged as a bug (a bucket or
variant the warm-up missed).

A sampler variant first needed after warm-up compiles on a thread of its own. Served, the steps meanwhile
run a stand-in loaded in the background, a variant with every stage on that samples each row exactly as
the missing one would (`stands_in_for`): a new mix of sampling options does not stall the other requests'
steps for its compile (0.4-1.7 s on CPU).

    activation_bytes(model, attention, buckets)   the largest bucket's activation peak (KV budget)
    BucketCompiler.warm_up(background)            every bucket now, or only the smallest now
    BucketCompiler.load_in_background()           ... and the rest on loader threads, smallest first
    BucketCompiler.forward(T, P), .sampler(S, f)  what a step runs; a program still loading is waited for
"""

from __future__ import annotations

import contextlib
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

from jaxllm.engine.live_status import CompileState
from jaxllm.runner.attention import Attention
from jaxllm.runner.input_batch import BAD_WORDS_MIN_SHAPE, SamplerNeeds
from jaxllm.runner.kv_cache import KvFormat, layer_state_spec
from jaxllm.runner.limits import GiB, SchedulerLimits
from jaxllm.runner.model_loading import LoadedModel
from jaxllm.runner.sampler import LogprobWidths, SamplerFlags, SamplingBatch, sample
from jaxllm.runner.step_inputs import ForwardInputs, StableInputs, split_tables
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import MAX_LOGPROB_TOKEN_IDS

logger = logging.getLogger(__name__)

# Widest page table (pages per request) sent whole every step with the Mosaic kernel: 8192 tokens
# at 16-token pages; longer contexts keep two widths.
_ONE_PAGE_WIDTH_UP_TO = 512

# The bias table width the sampler variants are compiled for ahead: the narrowest the runner sends.
_AOT_BIAS_WIDTH = 16

# Sampler variants compiled at warmup: greedy and temperature-only batches, each also with grammar
# bitmasks (structured outputs), the variants of the default sampling params and of the documented
# examples; rarer options (other top-k/p and penalty mixes, biases, logprobs) compile on use.
_WARM_SAMPLERS = tuple(
    SamplerFlags(all_greedy=greedy, bitmask=bitmask) for greedy in (True, False) for bitmask in (False, True)
)

# The sampling fields of README's examples (the openai client's `extra_body`, `LLM.generate`'s
# SamplingParams): a newcomer's first requests, which should not wait for a compile.
DOCUMENTED_SAMPLING: tuple[dict[str, Any], ...] = (
    {"top_k": 20, "repetition_penalty": 1.05},
    {"temperature": 0.8, "top_p": 0.95},
)


def setup_compilation_cache(path: str | None) -> None:
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def page_buckets(max_pages: int, count: int = 2, ratio: int = 4) -> list[int]:
    """A few pages-per-request widths: max_pages, max_pages / 4, ... (at least 4 pages).

    NOTE: the longest request of a busy batch usually needs the widest bucket anyway, so narrow
    ones only pay off for small batches (latency); two keep the compile count down."""
    out = [max_pages]
    while len(out) < count and out[-1] // ratio >= 4:
        out.append(out[-1] // ratio)
    return sorted(out)


def warm_sampler_flags(default_sampling: SamplingParams | None) -> list[SamplerFlags]:
    """_WARM_SAMPLERS and the variants of batches of requests that keep some of the default
    sampling params: its penalties and biases with greedy batches, and with sampled ones with
    and without its top-k/p; each with and without bitmasks. Then the variant of each of
    DOCUMENTED_SAMPLING, alone (offline) and over the defaults (served), without bitmasks.

    NOTE: a model's generation config often makes top-p the default (Llama-3 instruct: temperature
    0.6, top_p 0.9); compiled on use, that variant would stall the first request of every batch
    size for a compile. The server fills each unset field from the defaults, so a request with
    temperature=0 or top_p=1 keeps the rest (a repetition penalty, say)."""
    out = list(_WARM_SAMPLERS)
    if default_sampling is not None:
        needs = SamplerNeeds.of(default_sampling)
        kinds = [(True, False), (False, False), (False, needs.top_k_top_p)]  # (all greedy, top-k/p)
        for greedy, top in kinds:
            for bitmask in (False, True):
                flags = SamplerFlags(all_greedy=greedy, top_k_top_p=top, penalties=needs.penalties,
                                     sparse_bias=needs.bias, bitmask=bitmask)
                if flags not in out:
                    out.append(flags)
    return out + [flags for flags in _documented_sampler_flags(default_sampling) if flags not in out]


def _documented_sampler_flags(default_sampling: SamplingParams | None) -> list[SamplerFlags]:
    out: list[SamplerFlags] = []
    for fields in DOCUMENTED_SAMPLING:
        for params in (SamplingParams(**fields), (default_sampling or SamplingParams()).clone(**fields)):
            needs = SamplerNeeds.of(params)
            flags = SamplerFlags(all_greedy=needs.greedy, top_k_top_p=needs.top_k_top_p, penalties=needs.penalties,
                                 sparse_bias=needs.bias)
            if flags not in out:
                out.append(flags)
    return out


def stand_in_sampler_flags(widths: LogprobWidths) -> SamplerFlags:
    """The stand-in: every stage on but grammar bitmasks, at the usual top-logprobs width.

    NOTE: one per slot count, loaded after every bucket (about 1.5 times a sampled variant's compile); a step
    with grammar masks, or with a wider top-logprobs table, waits for its variant as before."""
    return SamplerFlags(all_greedy=False, top_k_top_p=True, penalties=True, sparse_bias=True, logprobs=True,
                        top_logprobs=widths.narrow, logprob_token_ids=True)


def stands_in_for(stand_in: SamplerFlags, flags: SamplerFlags) -> bool:
    """Whether a step of `flags` run as `stand_in` (its sampling columns built for it) gives every row the same
    token, and each row that asks the same logprobs.

    A stage no row asks for changes nothing: top-k 0, top-p 1 and min-p 0 keep every token, penalties of 0
    (repetition 1) and an empty bias leave the logits as they are, greedy rows are sent temperature 0 (their
    argmax), and logprobs are read only for the rows that ask, from a table at least as wide. The bitmask must
    match: it decides when the step's sampling is dispatched."""
    return (stand_in.bitmask == flags.bitmask and (flags.all_greedy or not stand_in.all_greedy)
            and stand_in.top_k_top_p >= flags.top_k_top_p and stand_in.penalties >= flags.penalties
            and stand_in.sparse_bias >= flags.sparse_bias and stand_in.bad_words >= flags.bad_words
            and stand_in.logprobs >= flags.logprobs
            and stand_in.top_logprobs >= flags.top_logprobs and stand_in.logprob_token_ids >= flags.logprob_token_ids)


@dataclass(frozen=True)
class Buckets:
    """The padded step shapes compiled ahead."""

    tokens: tuple[int, ...]  # T, ascending (EngineLimits.token_buckets)
    pages: tuple[int, ...]  # P, ascending; the widest holds a max_model_len request
    max_num_seqs: int  # S = min(T, max_num_seqs)
    page_size: int  # tokens per KV page

    @classmethod
    def plan(cls, sched: SchedulerLimits, page_size: int, attention_name: str) -> Buckets:
        max_pages = -(-sched.max_model_len // page_size)
        # NOTE: the Mosaic kernel reads only the pages a request's kv_len covers, whatever the
        # table's width, so one width halves the buckets to compile (and the start-up); the wide
        # table costs only its host->device copy, [S, max_pages] i32 per step, kept small here.
        one_width = attention_name == "pallas" and max_pages <= _ONE_PAGE_WIDTH_UP_TO
        pages = [max_pages] if one_width else page_buckets(max_pages)
        return cls(tuple(sched.token_buckets), tuple(pages), sched.max_num_seqs, page_size)

    @property
    def keys(self) -> list[tuple[int, int]]:
        """Every (T, P), smallest T first."""
        return [(t, p) for t in self.tokens for p in self.pages]

    def slots(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def pick(self, num_tokens: int, pages_per_seq: int) -> tuple[int, int]:
        """(T, P) of the smallest bucket that holds a step of `num_tokens` whose longest request has `pages_per_seq`."""
        return next(t for t in self.tokens if t >= num_tokens), next(p for p in self.pages if p >= pages_per_seq)

    def input_bytes(self) -> int:
        """Device bytes of every bucket's forward inputs: their buffers stay allocated (`StableInputs`)."""
        return sum(ForwardInputs.zeros(t, self.slots(t), p).nbytes() for t, p in self.keys)


def _abstract_args(model: LoadedModel, buckets: Buckets, num_tokens: int, pages_per_seq: int, num_pages: int,
                   kv_format: KvFormat):
    """The forward's arguments for one bucket on a pool of `num_pages` pages in `kv_format`, as shapes
    and shardings."""
    rep = NamedSharding(model.mesh, PartitionSpec())
    inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                          ForwardInputs.zeros(num_tokens, buckets.slots(num_tokens), pages_per_seq))
    leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in model.leaves]
    kv = layer_state_spec(model.arch, num_pages, buckets.page_size, kv_format, model.mesh, model.rules)
    prev_tokens = jax.ShapeDtypeStruct((buckets.max_num_seqs,), jnp.int32, sharding=rep)
    return leaves, [kv] * model.arch.num_layers, inputs.batch(), inputs.placeholder_rows, prev_tokens


def activation_bytes(model: LoadedModel, attention: Attention, buckets: Buckets, cache_dir: str | None,
                     kv_format: KvFormat | None = None) -> int:
    """Temp memory of the largest bucket's forward, compiled against a small stand-in pool (in
    `kv_format`; None: pages of the model's dtype).

    NOTE: with a compilation cache the figure is kept beside it, keyed by the traced program
    (every shape, the kernel's body and its compiler params), the weights' shardings, jax's
    version and the device: a warm start then skips lowering that bucket and loading it from
    the cache only to read one number."""
    forward = jax.jit(model.forward_fn(attention.fn), donate_argnums=(1,))
    args = _abstract_args(model, buckets, buckets.tokens[-1], buckets.pages[-1], num_pages=buckets.pages[-1] + 1,
                          kv_format=KvFormat(model.dtype) if kv_format is None else kv_format)
    traced = forward.trace(*args)
    path = None
    if cache_dir:
        device = model.mesh.devices.flat[0]
        specs = [str(getattr(leaf.sharding, "spec", None)) for leaf in args[0]]
        key = "\n".join([str(traced.jaxpr), jax.__version__, jaxlib.__version__, device.device_kind,
                         device.client.platform_version, str(model.mesh.shape), *specs,
                         os.environ.get("XLA_FLAGS", "")])
        path = Path(cache_dir) / f"jaxllm-activation-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            temp = int(json.loads(path.read_text())["temp_size_in_bytes"])
            logger.debug("Activation peak of the largest bucket: %.2f GiB (from %s)", temp / GiB, path)
            return temp
    analysis = traced.lower().compile().memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
    logger.debug("Activation peak of the largest bucket: %.2f GiB", temp / GiB)
    if path is not None:
        with contextlib.suppress(OSError):
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps({"temp_size_in_bytes": temp}))
            scratch.replace(path)
    return temp


Job = tuple[int, tuple, Callable[[], Any]]  # (token bucket, program key, what compiles it)


class BucketCompiler:
    """The step's compiled programs, by key: ("forward", T, P), ("inputs", T, P) (the input
    unpacking, compiled into `step_inputs`' shared jit), ("sample", S, flags) and
    ("forward-all-logits", T, P)."""

    def __init__(self, model: LoadedModel, attention: Attention, buckets: Buckets, *, num_pages: int,
                 max_model_len: int, warm_samplers: list[SamplerFlags], stand_in: SamplerFlags,
                 kv_format: KvFormat):
        self.buckets = buckets
        self._kv_format = kv_format  # what each layer's KV state holds (kv_cache.kv_format)
        self.sharding = NamedSharding(model.mesh, PartitionSpec())  # every step input is replicated
        self._model, self._attention_name, self._num_pages = model, attention.name, num_pages
        self._max_model_len, self._vocab_size = max_model_len, model.arch.vocab_size
        self._warm_samplers = warm_samplers
        self._stand_in = stand_in  # loaded in the background after the buckets (served)
        self._first_use: ThreadPoolExecutor | None = None  # compiles the variants first needed after warm-up
        self._platform = model.mesh.local_devices[0].platform
        self._forward = jax.jit(model.forward_fn(attention.fn), donate_argnums=(1,))
        self._programs: dict[tuple, Any] = {}  # key -> program, or the Future of one loading
        self._warm = False
        self._loader: ThreadPoolExecutor | None = None
        self._deferred: list[Job] = []  # warm-up jobs left to the loader

    # ----- what a step runs ----------------------------------------------------------------

    def forward(self, num_tokens: int, pages_per_seq: int) -> Callable:
        """(leaves, kv_pages, batch, placeholder_rows, prev_tokens) -> (kv_pages, logits [S, V]) of a bucket."""
        return self._get_or_compile(("forward", num_tokens, pages_per_seq), self._compile_forward,
                                    num_tokens, pages_per_seq)

    def forward_all_logits(self, num_tokens: int, pages_per_seq: int) -> Callable:
        """The forward of a step that wants every token's logits (prompt logprobs, rare): the plain
        jit, compiled on first use of each shape."""
        key = ("forward-all-logits", num_tokens, pages_per_seq)
        if key not in self._programs:
            self._warn_compile(key)
            self._programs[key] = self._forward
        return self._forward

    def sampler(self, num_slots: int, flags: SamplerFlags) -> Callable:
        """(logits [S, V], SamplingBatch) -> (tokens [max_num_seqs] i32, logprobs or None). The
        common variants are compiled at warm-up; rarer ones compile on first use."""
        return self._get_or_compile(("sample", num_slots, flags), self._build_sampler, num_slots, flags)

    def runnable(self, num_slots: int, flags: SamplerFlags) -> SamplerFlags:
        """The variant a step that needs `flags` runs: `flags` once compiled; on its first use, it starts compiling
        on a thread, and the step runs a loaded stand-in that samples exactly as it (`stands_in_for`), or waits
        for it where none has loaded (offline, or early in a served start-up)."""
        key = ("sample", num_slots, flags)
        fn = self._programs.get(key)
        if fn is not None and (not isinstance(fn, Future) or fn.done()):
            return flags
        if fn is None:
            self._warn_compile(key)
            if self._first_use is None:
                self._first_use = ThreadPoolExecutor(1, thread_name_prefix="jaxllm-first-use")
            self._programs[key] = future = self._first_use.submit(self._build_sampler, num_slots, flags, True)
            future.add_done_callback(partial(self._loaded, key))
        stand_in = self._programs.get(("sample", num_slots, self._stand_in))
        if stand_in is not None and not isinstance(stand_in, Future) and stands_in_for(self._stand_in, flags):
            return self._stand_in
        return flags

    def _get_or_compile(self, key: tuple, build: Callable[..., Any], *args: Any) -> Any:
        """The program `_programs` holds for `key` once ready; `build(*args)` now (a warm-up gap, logged) if it
        never was."""
        fn = self._ready(key)
        if fn is None:
            self._warn_compile(key)
            fn = self._programs[key] = build(*args)
        return fn

    def ready(self) -> set[tuple]:
        """The keys of the programs compiled or loaded."""
        return {key for key, fn in self._programs.items() if not isinstance(fn, Future)}

    def loading(self) -> set[tuple]:
        """The keys of the programs still loading in the background (or queued to)."""
        return {key for key, fn in self._programs.items() if isinstance(fn, Future)}

    def state(self) -> CompileState:
        """Each forward bucket, loaded or not, and the sampler variants loaded (safe from any thread)."""
        programs = dict(self._programs)  # NOTE: one C call: the engine thread may add keys meanwhile
        loaded = {key for key, fn in programs.items()
                  if not isinstance(fn, Future) or (fn.done() and not fn.cancelled() and fn.exception() is None)}
        return CompileState(tuple((t, p, ("forward", t, p) in loaded) for t, p in self.buckets.keys),
                            sum(1 for key in loaded if key[0] == "sample"))

    def _ready(self, key: tuple) -> Any:
        """What `_programs` holds for `key`, once ready (a bucket loading in the background is
        waited for, with its input unpacking); None if it was never compiled."""
        fn = self._programs.get(key)
        if isinstance(fn, Future) and fn.cancelled():  # shut down before it loaded
            return None
        if isinstance(fn, Future):
            fn = self._programs[key] = fn.result()
            if key[0] == "forward":
                self._ready(("inputs", *key[1:]))
        return fn

    def _warn_compile(self, key: tuple) -> None:
        if self._warm:
            logger.warning("Compiling after warmup: %s (a bucket or variant missing from warmup)", key)

    # ----- warm-up -------------------------------------------------------------------------

    def warm_up(self, background: bool) -> None:
        """Compile (or load from the compilation cache) every bucket's forward, the common sampler
        variants and the input unpacking of both, smallest token bucket first.

        background: only the smallest token bucket's; `load_in_background` loads the others on a
        thread pool, and a step that needs one still loading waits for it (`_ready`).

        NOTE: otherwise the first served request waits for every bucket, loaded one after the
        other (tracing and lowering hold the GIL)."""
        start = time.perf_counter()
        jobs = self._warmup_jobs()
        first = [job for job in jobs if job[0] == jobs[0][0]]  # the smallest token bucket's
        # GPU compiles autotune on the device: a few at a time, or they slow each other down.
        workers = max(1, min(len(jobs), os.cpu_count() or 1, 4 if self._platform == "gpu" else 2))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="jaxllm-compile")
        pending = {key: pool.submit(fn) for _, key, fn in (first if background else jobs)}
        # NOTE: disable=None: no bar where stderr is no terminal (a log file would keep its first frame).
        bar = tqdm(pending.items(), desc="Compiling buckets", unit="job", leave=False,
                   disable=True if background else None)
        for key, future in bar:
            self._programs[key] = future.result()
        self._warm = True
        self._deferred = jobs[len(first):] + self._stand_in_jobs() if background else []
        if not self._deferred:
            pool.shutdown()
            self._log_compiled(start)
            return
        self._loader = pool
        logger.info("The %d-token buckets (%d of %d forward buckets) compiled in %.1f s; the other %d load in the "
                    "background", jobs[0][0], self._count_forward(first), len(self.buckets.keys),
                    time.perf_counter() - start, self._count_forward(self._deferred))

    def load_in_background(self) -> None:
        """Start loading what a background warm-up left (none offline).

        NOTE: called as the engine's loop starts, after the engine is built and described to its clients:
        the loaders hold the GIL for most of their time, and would slow the rest of the start-up (the
        tokenizer's load, pickling the engine's description to the HTTP process) severalfold."""
        if self._loader is None or not self._deferred:
            return
        start, futures, count = time.perf_counter(), [], self._count_forward(self._deferred)
        for _, key, fn in self._deferred:
            self._programs[key] = future = self._loader.submit(fn)
            future.add_done_callback(partial(self._loaded, key))
            futures.append(future)
        self._deferred = []
        threading.Thread(target=lambda: (wait(futures), self._log_compiled(start, count)), daemon=True).start()

    def wait_warm(self) -> None:
        """Wait until every program loading in the background is ready (tests, benchmarks)."""
        for key in list(self._programs):
            self._ready(key)

    def shutdown(self) -> None:
        """Cancel the buckets still queued to load (those loading finish): the process's exit
        would otherwise wait for all of them."""
        for pool in (self._loader, self._first_use):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        # NOTE: a later first use (an engine served, closed, then used again, as tests share one) starts a new pool.
        self._first_use = None

    def _warmup_jobs(self) -> list[Job]:
        """Every forward bucket, each sampler variant compiled at warm-up and each bucket's input
        unpacking, in token-bucket order."""
        jobs, samplers = [], set()
        for num_tokens, pages_per_seq in self.buckets.keys:
            jobs.append((num_tokens, ("forward", num_tokens, pages_per_seq),
                         partial(self._compile_forward, num_tokens, pages_per_seq)))
            jobs.append((num_tokens, ("inputs", num_tokens, pages_per_seq),
                         partial(self._warm_inputs, num_tokens, pages_per_seq)))
            num_slots = self.buckets.slots(num_tokens)
            for flags in self._warm_samplers:
                if (num_slots, flags) not in samplers:
                    samplers.add((num_slots, flags))
                    jobs.append((num_tokens, ("sample", num_slots, flags),
                                 partial(self._build_sampler, num_slots, flags, True)))
        return sorted(jobs, key=lambda job: job[0])

    def _stand_in_jobs(self) -> list[Job]:
        """The stand-in's input unpacking at each bucket, then the stand-in at each slot count: after every
        bucket, as a new mix of sampling options is rarer than a new batch size."""
        last = self.buckets.tokens[-1]
        inputs = [(last, ("stand-in-inputs", t, p), partial(self._warm_inputs, t, p, [self._stand_in]))
                  for t, p in self.buckets.keys]
        slots = sorted({self.buckets.slots(t) for t in self.buckets.tokens})
        samplers = [(last, ("sample", s, self._stand_in), partial(self._build_sampler, s, self._stand_in, True))
                    for s in slots]
        return inputs + samplers

    def _loaded(self, key: tuple, future: Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            logger.error("Loading %s in the background failed: %r", key, future.exception())
            return
        self._programs[key] = future.result()

    @staticmethod
    def _count_forward(jobs: list[Job]) -> int:
        return sum(1 for _, key, _ in jobs if key[0] == "forward")

    def _log_compiled(self, start: float, in_background: int = 0) -> None:
        """One line once every forward bucket is ready; `in_background`: how many of them the loaders compiled."""
        logger.info(
            "Compiled %d forward buckets (tokens %s x pages/request %s)%s in %.1f s; attention: %s",
            len(self.buckets.keys), list(self.buckets.tokens), list(self.buckets.pages),
            f", the last {in_background} in the background," if in_background else "", time.perf_counter() - start,
            self._attention_name,
        )

    # ----- compiling -----------------------------------------------------------------------

    def _compile_forward(self, num_tokens: int, pages_per_seq: int):
        start = time.perf_counter()
        args = _abstract_args(self._model, self.buckets, num_tokens, pages_per_seq, self._num_pages, self._kv_format)
        compiled = self._forward.lower(*args).compile()
        logger.debug("compiled bucket (%d tokens, %d pages) in %.1f s", num_tokens, pages_per_seq,
                     time.perf_counter() - start)
        return compiled

    def _build_sampler(self, num_slots: int, flags: SamplerFlags, aot: bool = False):
        max_seqs = self.buckets.max_num_seqs

        def run(logits, batch):
            tokens, logprobs = sample(logits, batch, flags)
            padded = jnp.zeros(max_seqs, jnp.int32).at[: tokens.shape[0]].set(tokens)
            return padded, logprobs

        fn = jax.jit(run)
        if not aot:
            return fn
        rep = self.sharding
        logits = jax.ShapeDtypeStruct((num_slots, self._vocab_size), jnp.float32, sharding=rep)
        placeholder = self._placeholder_sampling(num_slots, flags)
        if flags.bad_words:  # the runner adds the previous step's tokens on device
            placeholder.prev_tokens = np.zeros(max_seqs, np.int32)
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), placeholder)
        compiled = fn.lower(logits, batch).compile()
        if not flags.sparse_bias and not flags.bad_words:
            return compiled

        def run_compiled(logits: jax.Array, batch: SamplingBatch):
            # NOTE: compiled for the narrowest bias and bad-words tables; a wider one (a request with more ids)
            # goes through the jit, which compiles that width on its first use.
            if ((flags.sparse_bias and batch.bias_ids.shape[1] != _AOT_BIAS_WIDTH)
                    or (flags.bad_words and batch.bad_word_ids.shape[1:] != BAD_WORDS_MIN_SHAPE)):
                return fn(logits, batch)
            return compiled(logits, batch)

        return run_compiled

    def _warm_inputs(self, num_tokens: int, pages_per_seq: int, samplers: list[SamplerFlags] | None = None) -> None:
        """Compile the input unpacking of a bucket's steps as the runner ships them with these sampler variants
        (the warm ones by default): the forward's inputs with the sampling columns, or alone and then the
        columns of a step with grammar bitmasks.

        NOTE: through buffers of its own, which it then drops: a loader thread must not donate the
        buffers of a step the engine thread is preparing. The compiled unpacking is shared."""
        scratch = StableInputs(self.sharding)
        num_slots = self.buckets.slots(num_tokens)
        inputs = ForwardInputs.zeros(num_tokens, num_slots, pages_per_seq)
        scratch.put(inputs)
        for flags in self._warm_samplers if samplers is None else samplers:
            columns, _ = split_tables(self._placeholder_sampling(num_slots, flags))
            if flags.bitmask:
                scratch.put(columns)
            else:
                scratch.put(inputs, columns)

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
            batch.output_tokens = batch.prompt_tokens = table(self._max_model_len)
        if flags.sparse_bias:
            batch.bias_ids, batch.bias_values = table(_AOT_BIAS_WIDTH), table(_AOT_BIAS_WIDTH, np.float32)
            batch.allowed_only = row(np.bool_)
        if flags.bad_words:
            words, length = BAD_WORDS_MIN_SHAPE
            batch.bad_word_ids = np.zeros((num_slots, words, length), np.int32)
            batch.recent_outputs, batch.pending_rows = table(length - 1), row()
        if flags.bitmask:
            batch.bitmask = table(-(-self._vocab_size // 32))
        if flags.logprob_token_ids:
            batch.logprob_token_ids = table(MAX_LOGPROB_TOKEN_IDS)
        return batch
