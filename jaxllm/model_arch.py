"""What jaxllm needs to know about a checkpoint's architecture, read from HF `config.json`.

No jax here: the engine and the server read vocab size, EOS ids and context length from it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF architecture name -> family switches of the one Llama-family module.
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    pass


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
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    # Per layer: the sliding window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
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


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    architectures = cfg.get("architectures") or []
    name = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if name is None:
        shown = ", ".join(architectures) or f"model_type={cfg.get('model_type')!r}"
        raise UnsupportedModelError(
            f"unsupported architecture {shown}; jaxllm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    switches = SUPPORTED_ARCHITECTURES[name]
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    rope_scaling = cfg.get("rope_scaling") or None
    rope_theta = float(cfg.get("rope_theta", 10000.0))
    # transformers 5 may fold theta and scaling into "rope_parameters".
    rope_params = cfg.get("rope_parameters")
    if isinstance(rope_params, dict):
        rope_theta = float(rope_params.get("rope_theta", rope_theta))
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            rope_scaling = None
    num_layers = int(cfg["num_hidden_layers"])
    return ModelArch(
        architecture=name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=switches.get("qkv_bias", False) or bool(cfg.get("attention_bias", False)),
        qk_norm=switches.get("qk_norm", False),
        sliding_windows=_sliding_windows(cfg, num_layers),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        raw=cfg,
    )


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
