"""A response's `usage` object, and which chunks of a stream carry it, as vLLM 0.34.0 sends them.

    usage(prompt_tokens, completion_tokens, cached_tokens=..., reasoning_tokens=...) -> the usage dict
    stream_usage(request.stream_options, force=args.enable_force_include_usage) -> StreamUsage
    final_usage_chunk(head, usage, metrics) -> the stream's last chunk (choices [], no null keys)

`usage.prompt_tokens_details` is there only with --enable-prompt-tokens-details (`cached_tokens` None leaves
it out); `usage.completion_tokens_details` is `{"reasoning_tokens": N}` with a reasoning parser, else null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve.protocol import StreamOptions


@dataclass(frozen=True)
class StreamUsage:
    final: bool  # a last chunk with the usage (and `choices: []`)
    continuous: bool  # usage on every chunk too


def stream_usage(options: StreamOptions | None, *, force: bool) -> StreamUsage:
    """vLLM's rule: --enable-force-include-usage turns on both; else `stream_options` (off when absent)."""
    if force:
        return StreamUsage(final=True, continuous=True)
    final = bool(options and options.include_usage)
    return StreamUsage(final=final, continuous=final and bool(options and options.continuous_usage_stats))


def usage(prompt_tokens: int, completion_tokens: int, *, cached_tokens: int | None = None,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    """`cached_tokens`: None without --enable-prompt-tokens-details; `reasoning_tokens`: None without a
    reasoning parser."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens, "created_cache_tokens": None,
                                        "multimodal_tokens": None}
    out["completion_tokens_details"] = None if reasoning_tokens is None else {"reasoning_tokens": reasoning_tokens}
    return out


def final_usage_chunk(head: dict[str, Any], usage: dict[str, Any], metrics: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """The stream's usage chunk: `head` (id, object, created, model), no choices, and vLLM's serialization of
    it, which leaves out every null key."""
    body = {**head, "choices": [], "usage": _without_nulls(usage)}
    if metrics is not None:
        body["metrics"] = _without_nulls(metrics)
    return body


def _without_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: _without_nulls(value) if isinstance(value, dict) else value
            for key, value in obj.items() if value is not None}
