"""GET /tokenizer_info (--enable-tokenizer-info-endpoint): the tokenizer's configuration, as vLLM 0.34 shows it."""

from __future__ import annotations

from typing import Any

# File paths on the server's disk: never shown.
_HIDDEN_KEYS = ("vocab_file", "merges_file")


def tokenizer_info(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    """The arguments the tokenizer was built with (its tokenizer_config.json, mostly; added tokens as their
    text), `tokenizer_class`, and `chat_template` when the server was given one (--chat-template)."""
    config = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if key not in _HIDDEN_KEYS}
    info: dict[str, Any] = _json_ready(config)
    info["tokenizer_class"] = type(tokenizer).__name__
    if chat_template:
        info["chat_template"] = chat_template
    return info


def _json_ready(value: Any) -> Any:
    """Added tokens (objects with a `content`) as their text, through dicts and lists."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value
