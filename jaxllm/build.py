"""Assembling an engine: load the model, measure, resolve the limits, compile, and wire the engine around it.

The one place that builds an `LLMEngine` with a real runner, for the offline API (`jaxllm.llm`) and
for the server's engine (`jaxllm.serving`, in the engine process or on a thread):

    load the model -> measure the device -> resolve the limits (`jaxllm.runner.limits`, pure)
    -> the runner, its buckets compiled (`jaxllm.runner.compilation`) -> LLMEngine(config, limits, runner)
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxllm.config import EngineConfig, EngineLimits, StructuredOutputsConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.generation_config import GenerationDefaults, load_generation_defaults
from jaxllm.model_arch import load_arch
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.tokenizer import load_tokenizer, resolve_chat_template

if TYPE_CHECKING:
    from jaxllm.runner.attention import Attention
    from jaxllm.runner.compilation import Buckets
    from jaxllm.runner.kv_cache import KvFormat
    from jaxllm.runner.limits import DeviceFacts, SchedulerLimits
    from jaxllm.runner.model_loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    engine: LLMEngine
    generation_defaults: GenerationDefaults
    chat_template: str | None
    model_type: str | None  # config.json's (`EngineInfo.model_type`)


def build_engine(config: EngineConfig, *, served: bool = False, log_stats: bool = False) -> EngineParts:
    """Load the model, resolve the limits, compile the buckets and wire the engine around them."""
    # The only jax imports on this path:
    from jaxllm import distributed  # noqa: PLC0415
    from jaxllm.models.loader import resolve_model_dir  # noqa: PLC0415
    from jaxllm.runner import kv_cache  # noqa: PLC0415
    from jaxllm.runner.attention import select_attention  # noqa: PLC0415
    from jaxllm.runner.compilation import Buckets, setup_compilation_cache  # noqa: PLC0415
    from jaxllm.runner.limits import scheduler_limits  # noqa: PLC0415
    from jaxllm.runner.model_loading import load_model  # noqa: PLC0415
    from jaxllm.runner.model_runner import ModelRunner  # noqa: PLC0415
    from jaxllm.runner.platforms import select_jax_platforms  # noqa: PLC0415

    start = time.perf_counter()
    select_jax_platforms()  # before any device is touched
    distributed.initialize(config.parallel)  # likewise
    model_dir = resolve_model_dir(config.model.model, config.model.revision)
    defaults = load_generation_defaults(model_dir, config.model.generation_config, config.model.revision)
    tokenizer_source, tokenizer_start = config.model.tokenizer or model_dir, time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_source, config.model.revision)
    logger.info("Loaded the tokenizer (%d tokens) from %s in %.1f s", len(tokenizer), tokenizer_source,
                time.perf_counter() - tokenizer_start)
    arch = load_arch(model_dir)
    eos = set(defaults.eos_token_ids) | set(arch.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    grammar_compiler = _grammar_compiler(tokenizer, arch.vocab_size, config.structured_outputs_config)
    # NOTE: the first grammar compile for a tokenizer builds the grammar backend's view of its vocabulary,
    # about a second of GIL with a 150k vocabulary: done here, beside the model's loading and compiling
    # (much of it GIL-free), it never stalls the engine's loop under a running batch.
    warm_grammars = threading.Thread(target=_warm_up, args=(grammar_compiler, eos), daemon=True)
    warm_grammars.start()
    setup_compilation_cache(config.compilation_cache_dir)
    model = load_model(config.model, config.parallel)
    device = kv_cache.measure_device(model.mesh)
    sched = scheduler_limits(config, device, model.arch.context_limit, served=served)
    page_size = config.cache.block_size
    attention = select_attention(config.model.attention_backend, model.arch, model.dtype, page_size, model.mesh,
                                 model.rules)
    buckets = Buckets.plan(sched, page_size, attention.name)
    kv_format = kv_cache.kv_format(config.cache, model, config.model.load_format)
    limits = _with_kv_pool(config, sched, device, model, attention, buckets, kv_format)
    runner = ModelRunner(model, attention, buckets, limits, max_logprobs=config.model.max_logprobs,
                         seed=config.model.seed, served=served,
                         default_sampling=_default_sampling(defaults), kv_format=kv_format)
    engine = LLMEngine(config, limits, runner, tokenizer, arch.vocab_size, sorted(eos), log_stats=log_stats,
                       grammar_compiler=grammar_compiler)
    parts = EngineParts(engine, defaults, resolve_chat_template(config.model.chat_template),
                        arch.raw.get("model_type"))
    warm_grammars.join()
    freeze_startup_heap()
    logger.info("Engine ready in %.1f s: up to %d tokens per request, %d requests and %d tokens per step",
                time.perf_counter() - start, limits.max_model_len, limits.max_num_seqs,
                limits.max_num_batched_tokens)
    return parts


def _with_kv_pool(config: EngineConfig, sched: SchedulerLimits, device: DeviceFacts, model: LoadedModel,
                  attention: Attention, buckets: Buckets, kv_format: KvFormat) -> EngineLimits:
    """The limits with the KV pool the device's memory leaves after the weights, the largest
    bucket's activation peak and the buffers of every bucket's inputs."""
    from jaxllm.runner import kv_cache  # noqa: PLC0415
    from jaxllm.runner.compilation import activation_bytes  # noqa: PLC0415
    from jaxllm.runner.limits import kv_pool, resolve_limits  # noqa: PLC0415

    activation = 0
    if device.memory_limit is not None:  # else (CPU) a fixed budget
        activation = activation_bytes(model, attention, buckets, config.compilation_cache_dir, kv_format)
    page_size = config.cache.block_size
    page_bytes = kv_cache.bytes_per_page(model.arch, page_size, kv_format.dtype, model.mesh.devices.size,
                                         model.rules)
    # The memory in use measured again, after the activation compile, where the pool will be allocated.
    pool = kv_pool(config.cache, kv_cache.measure_device(model.mesh), activation + buckets.input_bytes(), page_bytes)
    pool = dataclasses.replace(pool, num_pages=kv_cache.same_on_every_process(pool.num_pages))
    limits = resolve_limits(sched, page_size, pool)
    kv_cache.log_pool(limits.num_pages, page_size, limits.max_model_len, page_bytes, activation, kv_format.dtype)
    return limits


def _default_sampling(defaults: GenerationDefaults) -> SamplingParams | None:
    """The default sampling params, for warmup; None (and requests will say why) when invalid."""
    try:
        return SamplingParams(**defaults.sampling)
    except (TypeError, ValueError) as exc:
        logger.warning("The generation config's sampling defaults %s are not valid: %s", defaults.sampling, exc)
        return None


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (model tree, tokenizer tables, compiled executables) out
    of the garbage collector's reach.

    NOTE: a full collection otherwise walks that heap again and again while requests run, each a
    stall of the device of up to hundreds of ms (bench/host_overhead.py shows it); vLLM tunes its
    engine's collector for the same reason."""
    gc.collect()
    gc.freeze()


def _warm_up(grammar_compiler: Any, eos_token_ids: set[int]) -> None:
    """Compile one small grammar with the engine's stop ids (as `LLMEngine.compile_grammar` will)."""
    if grammar_compiler is None:
        return
    try:
        grammar_compiler(SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True),
                                        all_stop_token_ids=set(eos_token_ids)))
    except Exception:  # the first request with a grammar will say what is wrong
        logger.exception("The grammar backend's warm-up failed")


def _grammar_compiler(tokenizer, vocab_size: int, options: StructuredOutputsConfig):
    """Structured outputs, when the grammar package is installed (None otherwise)."""
    try:
        from jaxllm.structured import make_grammar_compiler
    except ImportError:
        return None
    return make_grammar_compiler(tokenizer, vocab_size, options)
