"""Default sampling parameters from the model's `generation_config.json`: vLLM's `--generation-config`.

- `auto` (default): the model's generation config gives the defaults that a request does not set
  (vLLM's `ModelConfig.get_diff_sampling_param`).
- `vllm`: no defaults from the model; `SamplingParams`' own defaults apply.
- a directory: the `generation_config.json` in that directory gives the defaults.

Whatever the mode, `eos_token_ids` comes from the generation config (the model's for `auto` and
`vllm`, the directory's otherwise), because vLLM always stops on those ids (`SamplingParams.
update_from_generation_config`): the tokenizer's EOS ends a request with `stop_reason=None`, and
every other id of this list is added to `stop_token_ids` (unless `ignore_eos`), so it ends the
request with `stop_reason=<id>`. stories260K, for instance, lists `[2, 1]`: it ends a story with BOS.

No jax here: only transformers' `GenerationConfig` and the model's config.json, read offline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# NOTE: from its module, not the package: `transformers.AutoConfig` and the package's GenerationConfig
# import torch (through the rope utilities), which no part of jaxllm needs.
from transformers.generation.configuration_utils import GenerationConfig

logger = logging.getLogger(__name__)

# The generation-config keys vLLM turns into default sampling params (HF name -> SamplingParams name).
SAMPLING_KEYS: dict[str, str] = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}

OVERRIDE_WARNING = (
    "Default sampling parameters have been overridden by the model's Hugging Face generation config "
    "recommended from the model creator. If this is not intended, please relaunch jaxllm with "
    "`--generation-config vllm`."
)


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    # SamplingParams keyword arguments a request falls back to (e.g. {"temperature": 0.6, "top_p": 0.9}).
    sampling: dict[str, Any] = field(default_factory=dict)
    # Token ids that end generation, from the generation config's `eos_token_id` ([] if it has none).
    eos_token_ids: list[int] = field(default_factory=list)
    # Where `sampling` came from, for vLLM's log line "Using default chat sampling params from %s: %s":
    # "model" (auto), "vllm", or the directory given.
    source: str = "model"


def load_generation_defaults(
    model: str | Path, generation_config: str = "auto", revision: str | None = None
) -> GenerationDefaults:
    """Read the defaults for `ModelConfig.generation_config` ("auto", "vllm" or a directory).

    Logs vLLM's warning once when the model's file changes the defaults.
    """
    if generation_config in ("auto", "vllm"):
        config = read_generation_config(model, revision=revision)
    else:
        directory = Path(generation_config)
        if not (directory / "generation_config.json").is_file():
            # NOTE: vLLM silently falls back to no defaults here; a typo in the flag should not do that.
            raise ValueError(
                f"--generation-config must be 'auto', 'vllm' or a directory holding generation_config.json; "
                f"{generation_config!r} is not"
            )
        config = read_generation_config(directory)
    sampling = {} if generation_config == "vllm" else sampling_overrides(config)
    if sampling:
        _warn_once(OVERRIDE_WARNING)
    source = "model" if generation_config == "auto" else generation_config
    return GenerationDefaults(sampling=sampling, eos_token_ids=eos_token_ids(config), source=source)


def read_generation_config(model: str | Path, revision: str | None = None) -> dict[str, Any]:
    """The generation config's values that differ from transformers' defaults (vLLM's
    `try_get_generation_config(...).to_diff_dict()`); {} when the model has none.

    Without a generation_config.json, transformers derives one from config.json (its token ids).
    """
    try:
        config = GenerationConfig.from_pretrained(str(model), revision=revision, local_files_only=True)
    except OSError:
        token_ids = _config_token_ids(model, revision)
        if token_ids is None:  # no config.json either
            return {}
        config = GenerationConfig(**token_ids)
    return config.to_diff_dict()


# The config.json keys transformers' `GenerationConfig.from_model_config` takes over (the token ids).
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _config_token_ids(model: str | Path, revision: str | None) -> dict[str, Any] | None:
    """The token ids of the model's config.json (a multimodal model's `text_config` fills in what the top
    level lacks), or None without a config.json."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download  # noqa: PLC0415

            path = Path(hf_hub_download(str(model), "config.json", revision=revision, local_files_only=True))
        except Exception:  # the hub raises several types for "not in cache"
            return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    ids = {key: config.get(key, text.get(key)) for key in _TOKEN_ID_KEYS}
    return {key: value for key, value in ids.items() if value is not None}


def sampling_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams defaults from a generation config dict: the keys in `SAMPLING_KEYS` that are set,
    with HF's `max_new_tokens` renamed to `max_tokens`. Other keys (`do_sample`, ids) are ignored, as in vLLM."""
    return {ours: config[hf] for hf, ours in SAMPLING_KEYS.items() if config.get(hf) is not None}


def eos_token_ids(config: dict[str, Any]) -> list[int]:
    """The `eos_token_id` of a generation config as a list (it may be an int, a list or absent)."""
    value = config.get("eos_token_id")
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
