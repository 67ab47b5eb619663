"""Logprobs in the two OpenAI shapes.

Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (parallel lists).
Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Prompt logprobs (vLLM's `prompt_logprobs` key): `[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]`.
The engine gives one `{token_id: Logprob}` dict per output position: the sampled token, then the top-k (the
whole vocabulary for -1) or the request's `logprob_token_ids`.
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

    @classmethod
    def of(cls, tokenizer: Any, requested: bool | None, server_default: bool) -> TokenNamer:
        """The request's `return_tokens_as_token_ids`, else the server's --return-tokens-as-token-ids."""
        return cls(tokenizer, server_default if requested is None else requested)

    def __call__(self, token_id: int, logprob: Logprob | None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


def _value(logprob: Logprob | None) -> float | None:
    return None if logprob is None else max(logprob.logprob, _MIN_LOGPROB)


def _top(position: dict[int, Logprob], k: int | None) -> list[tuple[int, Logprob]]:
    """The k best-ranked entries; None: all of them, in the engine's order (-1, or `logprob_token_ids`)."""
    if k is None:
        return list(position.items())
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    return ranked[:k]


def top_count(requested: int | None, *, token_ids_listed: bool) -> int | None:
    """How many top entries a position shows: the request's count, or None (all) for -1 or when the request
    listed the token ids to score (vLLM's `logprob_token_ids`)."""
    return None if token_ids_listed or requested == -1 else requested or 0


def completion_logprobs(
    token_ids: list[int],
    positions: list[dict[int, Logprob] | None],
    num_top: int | None,
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
    token_ids: list[int], positions: list[dict[int, Logprob] | None], num_top: int | None, name: TokenNamer
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


def prompt_logprobs_json(positions: list[dict[int, Logprob] | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), token id -> its Logprob's fields."""
    if positions is None:
        return None
    return [None if position is None else {
        str(token_id): {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for token_id, lp in position.items()
    } for position in positions]
