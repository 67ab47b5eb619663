"""One `EngineConfig`, built once and passed down.

It is made of four small dataclasses (model / cache / scheduler / parallel). Every field has a
default and a one-line doc in its metadata: the CLI (`python -m jaxllm.serve --help`) and the
`LLM(...)` keyword arguments are generated from these fields, so a flag exists exactly when a
field does. Values known only at startup (the number of KV pages, device-dependent defaults) are
resolved once, before the engine is built, into an `EngineLimits`; no component writes back into the
config.

This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The model served when no --model is given: a real, tiny trained Llama (stories260K).
DEFAULT_MODEL = str(Path(__file__).parent / "data" / "stories260K")

# KV bytes on CPU, where the device reports no free memory to size the pool from.
CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


def option(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line doc (and optional choices) used for --help."""
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = option(DEFAULT_MODEL, "Hugging Face model directory or id (from the local HF cache).")
    tokenizer: str | None = option(None, "Tokenizer directory or id; defaults to the model's.")
    revision: str | None = option(None, "Revision (branch, tag or commit) of a model id in the HF cache.")
    dtype: str = option(
        "auto",
        "Weight and activation dtype; auto takes the checkpoint's (float32 becomes bfloat16 on GPU).",
        choices=("auto", "bfloat16", "float16", "float32", "half", "float"),
    )
    max_model_len: int | None = option(None, "Context length (prompt + output); defaults to the model's.")
    load_format: str = option(
        "auto", "How to load weights: auto/safetensors, or dummy (random weights for benchmarks).",
        choices=("auto", "safetensors", "dummy"),
    )
    quantization: str | None = option(
        None, "The checkpoint's weight quantization (awq, gptq, compressed-tensors int4; awq_marlin and "
        "gptq_marlin name the same), checked against its quantization_config; with --load-format dummy, random "
        "weights in that int4 layout. fp8 (fp8_per_tensor; fp8_per_block): an fp8 checkpoint as it is, a float "
        "one quantized to FP8 at load (one scale per weight tensor; per 128x128 block), dynamic activation scales.",
        choices=("awq", "gptq", "compressed-tensors", "awq_marlin", "gptq_marlin", "fp8", "fp8_per_tensor",
                 "fp8_per_block"),
    )
    seed: int = option(0, "Seed for dummy weights and for requests that give no seed.")
    max_logprobs: int = option(
        20, "Most logprobs (and prompt_logprobs) a request may ask for; -1 allows the whole vocabulary."
    )
    served_model_name: list[str] = option([], "Name(s) the API answers to; the first is reported.")
    chat_template: str | None = option(None, "Chat template file or inline Jinja text, overriding the model's.")
    generation_config: str = option(
        "auto", "Default sampling params: auto reads generation_config.json, vllm uses vLLM's defaults, "
        "or a directory holding generation_config.json.",
    )
    attention_backend: str = option(
        "auto", "Attention implementation: auto (Pallas kernel on a GPU when the model fits it), pallas, "
        "xla (gather + dense attention) or reference (per-request loop; tests only).",
        choices=("auto", "pallas", "xla", "reference"),
    )

    @property
    def served_names(self) -> list[str]:
        """The names the API answers to, the first reported in responses: --served-model-name, else the
        --model value as given.

        NOTE: with no --model that value is the bundled model's install path, which no client should have
        to send, so the bundled model is served by its folder name."""
        if self.served_model_name:
            return list(self.served_model_name)
        return [Path(self.model).name if self.model == DEFAULT_MODEL else self.model]


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = option(16, "Tokens per KV page.")
    gpu_memory_utilization: float = option(
        0.9, "Fraction of device memory jaxllm may use for weights, activations and KV pages."
    )
    kv_cache_memory_bytes: int | None = option(
        None, "Bytes for KV pages, overriding --gpu-memory-utilization (default on CPU: 64 MiB)."
    )
    num_gpu_blocks_override: int | None = option(None, "Number of KV pages, overriding the memory-based size.")
    enable_prefix_caching: bool = option(True, "Reuse KV pages of shared prompt prefixes.")
    kv_cache_dtype: str = option(
        "auto", "KV page dtype: auto (the model's) or fp8 / fp8_e4m3 (e4m3 pages, half the bytes per token; "
        "per-tensor scales per layer: the checkpoint's k_scale / v_scale, else 1.0 as in vLLM).",
        choices=("auto", "fp8", "fp8_e4m3"),
    )
    calculate_kv_scales: bool = option(
        False, "FP8 KV pages: per-layer scales from the first step's keys and values (max abs K / 200, max abs V "
        "/ 100), as vLLM's calculate_kv_scales (a flag of earlier vLLM releases).",
    )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int | None = option(None, "Most requests in one step (default by device: 1024 / 256 / 16).")
    max_num_batched_tokens: int | None = option(
        None, "Token budget of one step (default by device and mode: 16384 offline / 8192 served on big GPUs)."
    )
    token_buckets: list[int] = option(
        [],
        "Padded token counts compiled at startup (default: powers of two up to the budget); "
        "a step of T tokens has min(T, max_num_seqs) request slots.",
    )
    async_scheduling: bool | None = option(
        None, "Prepare step N+1 while step N runs (default: on for one device on GPU, off on CPU meshes)."
    )
    stream_interval: int = option(1, "Output tokens between streamed deltas.")


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = option(1, "Devices that shard the model by heads (tensor parallelism).")
    enable_expert_parallel: bool = option(
        False, "MoE models: spread whole experts over the tensor-parallel devices instead of splitting each expert."
    )
    distributed_coordinator: str | None = option(
        None, "host:port of process 0 for a multi-process run (jax.distributed.initialize)."
    )
    num_processes: int = option(1, "Processes in a multi-process run (one per host; all run the same requests).")
    process_id: int = option(0, "This process's index in a multi-process run (0 is the coordinator).")

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id={self.process_id} must be in [0, num_processes={self.num_processes})")
        if self.num_processes > 1:
            host, _, port = (self.distributed_coordinator or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"num_processes={self.num_processes} needs distributed_coordinator as host:port of process 0, "
                    f"got {self.distributed_coordinator!r}"
                )


@dataclass(frozen=True, slots=True)
class StructuredOutputsConfig:
    """vLLM's --structured-outputs-config (set whole as JSON or field by field as
    --structured-outputs-config.backend=...). llguidance is the one grammar backend here."""

    backend: str = option(
        "auto", "Grammar backend; every choice runs on llguidance (vLLM's guidance backend).",
        choices=("auto", "guidance", "xgrammar", "outlines", "lm-format-enforcer"),
    )
    disable_any_whitespace: bool = option(False, "JSON output is compact: no whitespace between JSON tokens.")
    disable_additional_properties: bool = option(
        False, "JSON schemas that leave additionalProperties unset allow no properties beyond those declared."
    )

    def __post_init__(self) -> None:
        # NOTE: vLLM 0.34.0 refuses these combinations (its backends that lack the options), so a command
        # line that starts vLLM means the same here.
        if self.disable_any_whitespace and self.backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace is only supported for xgrammar and guidance backends.")
        if self.disable_additional_properties and self.backend != "guidance":
            raise ValueError("disable_additional_properties is only supported for the guidance backend.")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    compilation_cache_dir: str | None = option(
        os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "xla"),
        "Persistent XLA compilation cache (empty string turns it off).",
    )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (`LLM(model=..., max_num_seqs=...)`, CLI flags).

        Each name is looked up in the four groups; an unknown name is an error naming it.
        """
        per_group: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        top: dict[str, Any] = {}
        owners = field_owners()
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine option {key!r}")
            owner = owners[key]
            if owner is None:
                top[key] = value
            else:
                per_group[owner][key] = value
        built = {name: GROUPS[name](**values) for name, values in per_group.items()}
        for name, klass in NESTED.items():
            if isinstance(top.get(name), dict):
                top[name] = nested_config(klass, top[name])
        return cls(**built, **top)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What the engine runs with: the config's open values resolved against the model and the device
    (the context length, the scheduler's budgets, the KV pool from free memory), once, before the
    engine is built. The scheduler, the block manager and request validation read these."""

    max_model_len: int  # prompt + output tokens of one request
    block_size: int  # tokens per KV page
    num_pages: int  # KV pages in the pool
    max_num_seqs: int  # requests in one step
    max_num_batched_tokens: int  # query tokens in one step
    token_buckets: tuple[int, ...]  # padded token counts compiled ahead, ascending; the last is the budget
    async_scheduling: bool  # schedule step N + 1 while step N runs

    @classmethod
    def given(cls, config: EngineConfig, *, max_model_len: int, num_pages: int) -> EngineLimits:
        """The limits of a config that sets every scheduler value itself (tests, host-only benchmarks);
        `jaxllm.runner.limits` resolves the open ones against the device instead."""
        sched = config.scheduler
        if sched.max_num_seqs is None or sched.max_num_batched_tokens is None:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be set")
        buckets = tuple(sorted({*sched.token_buckets, sched.max_num_batched_tokens}))
        return cls(max_model_len, config.cache.block_size, num_pages, sched.max_num_seqs,
                   sched.max_num_batched_tokens, buckets, bool(sched.async_scheduling))


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}


# EngineConfig's fields that are whole dataclasses, set as one value (vLLM's --x-config JSON / dotted forms).
NESTED: dict[str, type] = {"structured_outputs_config": StructuredOutputsConfig}


def nested_config(klass: type, values: dict[str, Any]) -> Any:
    """One of NESTED's dataclasses from a JSON object (`--x-config '{...}'`, its dotted keys, `LLM(x_config=
    {...})`). Unknown keys, values of the wrong type and values outside the choices are ValueErrors naming
    them; a bool also reads from the strings true / false."""
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    typed: dict[str, Any] = {}
    for key, value in values.items():
        f = fields[key]
        if f.type == "bool" and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        expected = {"bool": bool, "str": str, "int": int, "float": int | float}[str(f.type)]
        if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
            raise ValueError(f"{key} must be a {f.type}, got {value!r}")
        if value not in f.metadata.get("choices", (value,)):
            raise ValueError(f"{key} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        typed[key] = value
    return klass(**typed)


def field_owners() -> dict[str, str | None]:
    """Flat option name -> the group that owns it (None for EngineConfig's own fields)."""
    owners: dict[str, str | None] = {}
    for group, klass in GROUPS.items():
        for f in dataclasses.fields(klass):
            owners[f.name] = group
    for f in dataclasses.fields(EngineConfig):
        if f.name not in GROUPS:
            owners[f.name] = None
    return owners


def option_fields() -> list[tuple[str | None, dataclasses.Field]]:
    """Every user-facing option as (group, field), in declaration order (for the CLI)."""
    out: list[tuple[str | None, dataclasses.Field]] = []
    for group, klass in GROUPS.items():
        out.extend((group, f) for f in dataclasses.fields(klass))
    out.extend((None, f) for f in dataclasses.fields(EngineConfig) if f.name not in GROUPS and f.name not in NESTED)
    return out
