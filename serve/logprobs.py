"""Logprobs in the two OpenAI shapes.

Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (parallel lists).
Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
The engine gives one `{token_id: Logprob}` dict per output position: the top-k plus the sampled token.
"""

from __future__ import annotations

from typing import Any

from jaxllm.outputs import Logprob

# JSON has no -inf; vLLM reports it as this floor.
_MIN_LOGPROB = -9999.0


class TokenNamer:
    """The string shown for a token id (`token_id:N` when the request asks for ids)."""

    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def __call__(self, token_id: int, logprob: Logprob | None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


def _value(logprob: Logprob | None) -> float | None:
    return None if logprob is None else max(logprob.logprob, _MIN_LOGPROB)


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return ranked[:k]


def completion_logprobs(
    token_ids: list[int],
    positions: list[dict[int, Logprob] | None],
    num_top: int,
    name: TokenNamer,
    text_offset: int,
) -> tuple[dict[str, Any], int]:
    """The completions shape for these tokens; returns it and the text offset after them."""
    out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token_id, position in zip(token_ids, positions, strict=False):
        chosen = position.get(token_id) if position else None
        token = name(token_id, chosen)
        out["tokens"].append(token)
        out["token_logprobs"].append(_value(chosen))
        out["text_offset"].append(text_offset)
        text_offset += len(token)
        if position is None:
            out["top_logprobs"].append(None)
            continue
        top = {name(t, lp): _value(lp) for t, lp in _top(position, num_top)}
        if chosen is not None:
            top.setdefault(token, _value(chosen))
        out["top_logprobs"].append(top)
    return out, text_offset


def chat_logprobs(
    token_ids: list[int], positions: list[dict[int, Logprob] | None], num_top: int, name: TokenNamer
) -> dict[str, Any]:
    content = []
    for token_id, position in zip(token_ids, positions, strict=False):
        chosen = position.get(token_id) if position else None
        token = name(token_id, chosen)
        top = [] if position is None else [
            {"token": (t_name := name(t, lp)), "logprob": _value(lp), "bytes": list(t_name.encode("utf-8"))}
            for t, lp in _top(position, num_top)
        ]
        content.append({
            "token": token,
            "logprob": _value(chosen) if chosen is not None else _MIN_LOGPROB,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": top,
        })
    return {"content": content}
