"""Streaming helpers for the tool-calling and reasoning tests: chunkings, and two accumulators of deltas."""

from __future__ import annotations

import random
from typing import Any

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk


def chunkings(text: str, seeds: range = range(4)) -> list[list[str]]:
    """Ways to split `text` into streamed deltas: whole, one character at a time, random pieces."""
    ways = [[text], list(text)]
    for seed in seeds:
        rng = random.Random(seed)
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 8)
            pieces.append(text[i : i + n])
            i += n
        ways.append(pieces)
    return ways


def run_stream(stream: Any, pieces: list[str]) -> list[dict[str, Any]]:
    """Every non-empty delta a streaming parser returns for `pieces`, then `finish()`."""
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    return [d for d in deltas if d]


def accumulate(deltas: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The tiny accumulator: concatenate content, and per index the name and the arguments fragments."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "type": None, "name": "", "arguments": ""})
            call["id"] = tc.get("id") or call["id"]
            call["type"] = tc.get("type") or call["type"]
            call["name"] += tc.get("function", {}).get("name") or ""
            call["arguments"] += tc.get("function", {}).get("arguments") or ""
    return content or None, [calls[i] for i in sorted(calls)]


def sdk_accumulate(deltas: list[dict[str, Any]]) -> Any:
    """The OpenAI SDK's own accumulation of the deltas as chat.completion.chunk objects: the final message."""
    state = ChatCompletionStreamState()
    first = True
    for delta in deltas:
        payload = dict(delta, role="assistant") if first else delta
        first = False
        state.handle_chunk(_chunk(payload, None))
    state.handle_chunk(_chunk({}, "stop"))
    return state.get_final_completion().choices[0].message


def _chunk(delta: dict[str, Any], finish_reason: str | None) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
