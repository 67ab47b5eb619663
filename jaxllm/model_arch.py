"""What jaxllm needs to know about a checkpoint's architecture, read from HF `config.json`.

No jax here: the engine and the server read vocab size, EOS ids and context length from it too.
`ARCHITECTURES` maps each supported HF `architectures` name to its family module
(`jaxllm/models/<module>.py`) and the reader that turns its config into a `ModelArch`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP: a router picks `top_k` of `num_experts` gated MLPs per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    renormalize: bool  # the chosen experts' softmax weights rescaled to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer: an MoE MLP (else a dense one of intermediate_size)
    swiglu_limit: float | None = None  # gpt-oss: its clamped SwiGLU, with biases on the router and experts
    # DeepSeek: always-on shared experts (n times one expert's width), how the router scores ("softmax" or
    # "sigmoid") and picks ("greedy"; "group_limited_greedy" or "noaux_tc": top-k within the topk_group best of
    # n_group groups), a learned correction added to the scores only for picking (V3), a factor on the weights.
    num_shared_experts: int = 0
    scoring: str = "softmax"
    topk_method: str = "greedy"
    num_groups: int = 1
    topk_groups: int = 1
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention: each token caches one latent of kv_lora_rank plus a
    shared rotary key of qk_rope_head_dim; heads see it through kv_b_proj's per-head up-projections."""

    q_lora_rank: int | None  # q through a low-rank q_a_proj / q_b_proj, else one q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # (nope + rope)^-0.5, times YaRN's mscale(mscale_all_dim)^2

    @property
    def latent_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


# quantization_config.quant_method values jaxllm loads: MXFP4 experts, int4 weight-only linears
# (`INT4_METHODS`, served by jaxllm/models/quantized.py) and FP8 linears (`fp8`, and compressed-tensors'
# float-quantized: jaxllm/models/quantized_fp8.py).
INT4_METHODS = ("awq", "gptq", "compressed-tensors")
SUPPORTED_QUANTIZATION = ("mxfp4", "fp8", *INT4_METHODS)


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 (e4m3) weights and activations: how the weights are scaled ("tensor", "channel": one scale
    per output feature, "block": one per `block` [out, in] tile), whether activations take the
    checkpoint's `input_scale` (static) or one scale per token (per token and 128 inputs under block
    scales), and whether the weights are quantized at load from an unquantized checkpoint."""

    weight_scales: str
    static_activations: bool = False
    online: bool = False
    block: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's `quantization_config`: its method, the modules it leaves unquantized, and for
    the int4 methods the weights' settings.

    `modules_to_not_convert` matches module names as each method's own loader does: globs (mxfp4),
    substrings (awq, gptq: vLLM's `modules_to_not_convert`; fp8's `ignored_layers`), or compressed-tensors' `ignore`
    entries (a full name, or `re:` and a regex matched from the name's start)."""

    method: str
    modules_to_not_convert: tuple[str, ...] = ()
    group_size: int = 128
    zero_point: bool = True  # asymmetric: per-group zero points stored (else the code's midpoint)
    desc_act: bool = False  # GPTQ act-order: g_idx permutes the input features' groups
    checkpoint_format: str = "gptq"  # GPTQ zero points: "gptq" stores z - 1, "gptq_v2" stores z
    fp8: Fp8Scheme | None = None  # FP8 weights and activations (quant_method fp8 or float-quantized)

    def converts(self, module: str) -> bool:
        """Whether the tensors of `module` (e.g. "model.layers.3.mlp.experts") are quantized."""
        if self.method == "mxfp4":
            return not any(fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(module, glob + ".*")
                           for glob in self.modules_to_not_convert)
        if self.method == "compressed-tensors":
            return not any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module
                           for entry in self.modules_to_not_convert)
        return not any(entry in module for entry in self.modules_to_not_convert)


def read_quantization(cfg: dict[str, Any]) -> Quantization | None:
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in SUPPORTED_QUANTIZATION:
        supported = ", ".join(SUPPORTED_QUANTIZATION)
        raise UnsupportedModelError(
            f"quantization_config.quant_method {method!r} is not supported; supported: {supported}")
    if method == "awq":
        return _awq(qc)
    if method == "gptq":
        return _gptq(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        return _fp8(qc)
    return Quantization(method, tuple(qc.get("modules_to_not_convert") or ()))


def _unsupported_if(condition: bool, what: str) -> None:
    if condition:
        raise UnsupportedModelError(f"quantization_config: {what} is not supported")


def _group_size(method: str, value: Any) -> int:
    _unsupported_if(int(value) <= 0, f"{method} group_size {value} (per-channel scales)")
    return int(value)


def _awq(qc: dict[str, Any]) -> Quantization:
    bits, version = int(qc.get("bits", qc.get("w_bit", 4))), str(qc.get("version", "gemm")).lower()
    _unsupported_if(bits != 4, f"awq bits={bits} (4 only)")
    _unsupported_if(version != "gemm", f"awq version {version!r} (gemm only)")
    _unsupported_if(not qc.get("zero_point", True), "awq without zero points")
    return Quantization("awq", tuple(qc.get("modules_to_not_convert") or ()),
                        _group_size("awq", qc.get("group_size", qc.get("q_group_size", 128))))


def _gptq(qc: dict[str, Any]) -> Quantization:
    bits = int(qc.get("bits", 4))
    _unsupported_if(bits != 4, f"gptq bits={bits} (4 only)")
    _unsupported_if(bool(qc.get("lm_head")), "gptq with a quantized lm_head")
    _unsupported_if(bool(qc.get("dynamic")), "gptq per-module `dynamic` overrides")
    checkpoint_format = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    _unsupported_if(checkpoint_format not in ("gptq", "gptq_v2"),
                    f"gptq checkpoint_format {checkpoint_format!r} (gptq, gptq_v2)")
    return Quantization("gptq", tuple(qc.get("modules_to_not_convert") or ()),
                        _group_size("gptq", qc.get("group_size", 128)), zero_point=not qc.get("sym", True),
                        desc_act=bool(qc.get("desc_act", False)), checkpoint_format=checkpoint_format)


def _compressed_tensors(qc: dict[str, Any]) -> Quantization:
    groups = list((qc.get("config_groups") or {}).values())
    _unsupported_if(len(groups) != 1, f"compressed-tensors with {len(groups)} config_groups (one only)")
    (group,) = groups
    fmt = str(group.get("format") or qc.get("format"))
    if fmt == "float-quantized":
        return _compressed_tensors_fp8(qc, group)
    _unsupported_if(fmt != "pack-quantized",
                    f"compressed-tensors format {fmt!r} (pack-quantized, float-quantized only)")
    _unsupported_if("Linear" not in (group.get("targets") or ()),
                    f"compressed-tensors targets {group.get('targets')} (Linear only)")
    _unsupported_if(bool(group.get("input_activations") or group.get("output_activations")),
                    "compressed-tensors activation quantization (int4 weight-only only)")
    w = group.get("weights") or {}
    desc = f"compressed-tensors weights {w.get('type')} {w.get('num_bits')}-bit {w.get('strategy')}"
    _unsupported_if((w.get("type"), int(w.get("num_bits", 0)), w.get("strategy")) != ("int", 4, "group"), desc)
    _unsupported_if(w.get("actorder") not in (None, "weight"), f"compressed-tensors actorder {w.get('actorder')!r}")
    _unsupported_if(bool(w.get("dynamic")), "compressed-tensors dynamic weight quantization")
    return Quantization("compressed-tensors", tuple(qc.get("ignore") or ()),
                        _group_size("compressed-tensors", w.get("group_size") or 0),
                        zero_point=not w.get("symmetric", True))


def _fp8_block(value: Any) -> tuple[int, int]:
    block = tuple(int(b) for b in value)
    _unsupported_if(block != (128, 128), f"fp8 weight block {list(block)} (128 x 128 only)")
    return block


def _fp8(qc: dict[str, Any]) -> Quantization:
    fmt, scheme = str(qc.get("fmt", "e4m3")).lower(), str(qc.get("activation_scheme", "dynamic")).lower()
    _unsupported_if(fmt != "e4m3", f"fp8 fmt {fmt!r} (e4m3 only)")
    _unsupported_if(scheme not in ("static", "dynamic"), f"fp8 activation_scheme {scheme!r}")
    block = qc.get("weight_block_size")
    _unsupported_if(block is not None and scheme == "static", "fp8 block-scaled weights with static activations")
    fp8 = Fp8Scheme("block", block=_fp8_block(block)) if block else Fp8Scheme("tensor", scheme == "static")
    return Quantization("fp8", tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()), fp8=fp8)


def _compressed_tensors_fp8(qc: dict[str, Any], group: dict[str, Any]) -> Quantization:
    _unsupported_if("Linear" not in (group.get("targets") or ()),
                    f"compressed-tensors targets {group.get('targets')} (Linear only)")
    _unsupported_if(bool(group.get("output_activations")), "compressed-tensors output activation quantization")
    w, a = group.get("weights") or {}, group.get("input_activations")
    strategy = w.get("strategy")
    desc = f"compressed-tensors float-quantized weights {w.get('type')} {w.get('num_bits')}-bit {strategy}"
    _unsupported_if((w.get("type"), int(w.get("num_bits", 0))) != ("float", 8)
                    or strategy not in ("tensor", "channel", "block") or bool(w.get("dynamic")), desc)
    _unsupported_if(not w.get("symmetric", True), "compressed-tensors asymmetric FP8 weights")
    _unsupported_if(not a, "compressed-tensors FP8 weight-only (no input_activations)")
    static = not a.get("dynamic", True)
    a_desc = f"compressed-tensors FP8 input_activations {a.get('type')} {a.get('num_bits')}-bit {a.get('strategy')}"
    _unsupported_if((a.get("type"), int(a.get("num_bits", 0))) != ("float", 8), a_desc)
    _unsupported_if(a.get("strategy") not in (("tensor",) if static else ("token", "group")), a_desc)
    _unsupported_if(static and strategy == "block", "compressed-tensors block-scaled weights with static activations")
    block = _fp8_block(w.get("block_structure") or (128, 128))
    return Quantization("compressed-tensors", tuple(qc.get("ignore") or ()),
                        fp8=Fp8Scheme(strategy, static_activations=static, block=block))


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    # llama3 / linear / yarn parameters as HF writes them (with "rope_type"); None: plain RoPE.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False  # o_proj's bias (Llama's attention_bias covers it; Qwen2's and GLM's do not)
    qk_norm: bool = False
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in each softmax's denominator
    # Fraction of each head's dims that RoPE rotates (GLM: 0.5); the rest pass through.
    partial_rotary_factor: float = 1.0
    # Rotate pairs (2i, 2i + 1) (GLM, GPT-J) instead of (i, i + D/2) (Llama's rotate_half).
    rope_interleaved: bool = False
    # GLM-4: a norm after the attention and after the MLP, before each residual add.
    post_sublayer_norms: bool = False
    # Per layer: the sliding window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    moe: MoE | None = None
    mla: MLA | None = None
    quantization: Quantization | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def family(self) -> str:
        """The module under jaxllm/models that builds it."""
        return ARCHITECTURES[self.architecture].module

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def context_limit(self) -> int:
        """The longest context the model takes, as vLLM derives it: max_position_embeddings, times
        the factor of linear scaling; YaRN's original context times its factor."""
        s = self.rope_scaling
        if s is None or s["rope_type"] not in ("linear", "yarn") or not s.get("factor"):
            return self.max_position_embeddings
        if s["rope_type"] == "yarn" and s.get("original_max_position_embeddings"):
            return int(s["original_max_position_embeddings"] * s["factor"])
        return int(self.max_position_embeddings * s["factor"])


@dataclass(frozen=True)
class CheckpointNames:
    """How a family's checkpoints may spell a parameter's path besides as it is."""

    optional_prefixes: tuple[str, ...] = ()  # prefixes the names may lack
    renames: tuple[tuple[str, str], ...] = ()  # (ours, theirs): a part of the path they name otherwise

    def candidates(self, name: str) -> list[str]:
        return ([name] + [name[len(p):] for p in self.optional_prefixes if name.startswith(p)]
                + [name.replace(ours, theirs) for ours, theirs in self.renames if ours in name])


@dataclass(frozen=True)
class Family:
    module: str  # jaxllm.models.<module>
    read: Callable[[str, dict[str, Any]], ModelArch]  # (architecture name, config.json) -> ModelArch
    names: CheckpointNames = CheckpointNames()


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling or None, partial_rotary_factor) from transformers 4's top-level fields
    (rope_theta, rope_scaling, partial_rotary_factor) or transformers 5's `rope_parameters`."""
    # NOTE: `or`, not a get() default: transformers 5 writes the old top-level keys as null.
    theta = float(cfg.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or None
    partial_factor = float(cfg.get("partial_rotary_factor") or 1.0)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta") or theta)
        partial_factor = float(params.get("partial_rotary_factor") or partial_factor)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is None:
        return theta, None, partial_factor
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, (None if rope_type == "default" else {**scaling, "rope_type": rope_type}), partial_factor


def _common(name: str, cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(
        quantization=read_quantization(cfg),
        architecture=name,
        vocab_size=int(cfg["vocab_size"]),
        num_layers=num_layers,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        raw=cfg,
    )


def read_llama_like(name: str, cfg: dict[str, Any], *, qkv_bias: bool = False,
                    qk_norm: bool = False, rope_interleaved: bool = False, post_sublayer_norms: bool = False,
                    o_bias: bool | None = None) -> ModelArch:
    """Llama's config names, shared by Mistral, Qwen2/3, GLM and gpt-oss. `attention_bias` puts a bias
    on q/k/v and (unless `o_bias` says otherwise) on o_proj, as in Llama."""
    attention_bias = bool(cfg.get("attention_bias", False))
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    num_layers = int(cfg["num_hidden_layers"])
    theta, scaling, partial_factor = _rope(cfg)
    return ModelArch(
        **_common(name, cfg, num_layers),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial_factor,
        rope_interleaved=rope_interleaved,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        qkv_bias=qkv_bias or attention_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        qk_norm=qk_norm,
        post_sublayer_norms=post_sublayer_norms,
        sliding_windows=_sliding_windows(cfg, num_layers),
    )


def read_mixtral(name: str, cfg: dict[str, Any]) -> ModelArch:
    """Mistral with every MLP an MoE of `num_local_experts` experts of intermediate_size."""
    arch = read_llama_like(name, cfg)
    moe = MoE(int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"]), arch.intermediate_size,
              renormalize=True, sparse_layers=(True,) * arch.num_layers)
    return dataclasses.replace(arch, moe=moe)


def read_qwen3_moe(name: str, cfg: dict[str, Any]) -> ModelArch:
    """Qwen3 (q/k norm) whose MLPs are MoE every `decoder_sparse_step` layers, except `mlp_only_layers`."""
    arch = read_llama_like(name, cfg, qk_norm=True)
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)  # transformers 5: the latter
    sparse = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(arch.num_layers))
    moe = MoE(num_experts, int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"]),
              renormalize=bool(cfg.get("norm_topk_prob", False)), sparse_layers=sparse)
    return dataclasses.replace(arch, moe=moe)


def read_gpt_oss(name: str, cfg: dict[str, Any]) -> ModelArch:
    """gpt-oss: attention with biases and sinks, alternating sliding and full layers (`layer_types`),
    YaRN, and an MoE of `num_local_experts` experts of intermediate_size in every layer."""
    arch = read_llama_like(name, cfg)
    top_k = int(cfg.get("num_experts_per_tok") or cfg["experts_per_token"])
    moe = MoE(int(cfg["num_local_experts"]), top_k, arch.intermediate_size, renormalize=True,
              sparse_layers=(True,) * arch.num_layers, swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
    return dataclasses.replace(arch, moe=moe, attention_sinks=True)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched by `factor` (transformers' yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_deepseek(name: str, cfg: dict[str, Any], *, v3: bool) -> ModelArch:
    """DeepSeek-V2/V3: MLA attention; dense MLPs in the first `first_k_dense_replace` layers, then an
    MoE of n_routed_experts (+ n_shared_experts always on). V2 scores by softmax and picks greedily
    or group-limited; V3 by sigmoid with a correction bias over groups (noaux_tc), then renormalises.
    The rotary part of each head (qk_rope_head_dim) is the arch's head_dim, as transformers has it."""
    rope_dim = int(cfg["qk_rope_head_dim"])
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("DeepSeek with attention_bias=true is not supported")
    interleaved = not v3 or bool(cfg.get("rope_interleave", True))  # V2 rotates interleaved pairs
    arch = read_llama_like(name, {**cfg, "head_dim": rope_dim}, rope_interleaved=interleaved)
    num_layers = arch.num_layers
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    num_experts = int(cfg.get("n_routed_experts") or 0)
    sparse = tuple(num_experts > 0 and i >= first_dense and i % freq == 0 for i in range(num_layers))
    topk_method = str(cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy"))
    scoring = str(cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"))
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UnsupportedModelError(f"DeepSeek topk_method {topk_method!r} is not supported")
    moe = MoE(num_experts, int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"]),
              renormalize=bool(cfg.get("norm_topk_prob", False)) and v3, sparse_layers=sparse,
              num_shared_experts=int(cfg.get("n_shared_experts") or 0), scoring=scoring, topk_method=topk_method,
              num_groups=int(cfg.get("n_group") or 1), topk_groups=int(cfg.get("topk_group") or 1),
              correction_bias=topk_method == "noaux_tc",
              routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))
    nope = int(cfg["qk_nope_head_dim"])
    scale = (nope + rope_dim) ** -0.5
    s = arch.rope_scaling
    if s is not None and s.get("mscale_all_dim"):  # transformers' yarn_apply_mscale
        mscale = yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
        scale *= mscale * mscale
    mla = MLA(int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None, int(cfg["kv_lora_rank"]), nope, rope_dim,
              int(cfg["v_head_dim"]), scale)
    return dataclasses.replace(arch, moe=moe, mla=mla)


def read_gpt2(name: str, cfg: dict[str, Any]) -> ModelArch:
    """GPT-2's names (n_embd, n_head, n_layer, n_positions, n_inner); learned positions, no RoPE."""
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModelError("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    hidden, num_heads, num_layers = int(cfg["n_embd"]), int(cfg["n_head"]), int(cfg["n_layer"])
    return ModelArch(
        **_common(name, cfg, num_layers),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        rope_theta=0.0,
        rope_scaling=None,
        max_position_embeddings=int(cfg.get("n_positions", 1024)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        hidden_act=str(cfg.get("activation_function", "gelu_new")),
        qkv_bias=True,
        sliding_windows=(None,) * num_layers,
    )


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", read_llama_like),
    "MistralForCausalLM": Family("llama", read_llama_like),
    "Qwen2ForCausalLM": Family("llama", partial(read_llama_like, qkv_bias=True, o_bias=False)),
    "Qwen3ForCausalLM": Family("llama", partial(read_llama_like, qk_norm=True)),
    # Mixtral's MoE MLP is `block_sparse_moe`, where every other family says `mlp`.
    "MixtralForCausalLM": Family("mixtral", read_mixtral, CheckpointNames(renames=((".mlp.", ".block_sparse_moe."),))),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", read_qwen3_moe),
    # Checkpoints saved by GPT2LMHeadModel prefix names with `transformer.`; the original ones do not.
    "GPT2LMHeadModel": Family("gpt2", read_gpt2, CheckpointNames(optional_prefixes=("transformer.",))),
    "GlmForCausalLM": Family("glm4", partial(read_llama_like, rope_interleaved=True, o_bias=False)),
    "Glm4ForCausalLM": Family(
        "glm4", partial(read_llama_like, rope_interleaved=True, post_sublayer_norms=True, o_bias=False)
    ),
    "GptOssForCausalLM": Family("gpt_oss", read_gpt_oss),
    "DeepseekV2ForCausalLM": Family("deepseek", partial(read_deepseek, v3=False)),
    # V3's multi-token-prediction layers (model.layers.<num_hidden_layers>...) are not loaded.
    "DeepseekV3ForCausalLM": Family("deepseek", partial(read_deepseek, v3=True)),
}


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    architectures = cfg.get("architectures") or []
    name = next((a for a in architectures if a in ARCHITECTURES), None)
    if name is None:
        shown = ", ".join(architectures) or f"model_type={cfg.get('model_type')!r}"
        raise UnsupportedModelError(
            f"unsupported architecture {shown}; jaxllm supports: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name].read(name, cfg)


def _sliding_windows(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None or cfg.get("use_sliding_window") is False:
        return (None,) * num_layers
    if "max_window_layers" in cfg:  # Qwen2: sliding window from max_window_layers on
        first = int(cfg["max_window_layers"])
        return tuple(window if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def load_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return arch_from_hf_config(json.loads(path.read_text()))
