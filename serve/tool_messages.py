"""Tool calls fed back in a conversation, made ready for the chat template (no web or engine imports:
the offline `LLM.chat` uses it too).

OpenAI clients send an assistant turn's calls back as `{"function": {"name", "arguments": "<JSON text>"}}`;
chat templates (Qwen2.5's `tool_call.arguments | tojson`, Llama 3's, Hermes') expect `arguments` to be
the parsed object, as transformers documents. vLLM parses them before rendering; so do we.
"""

from __future__ import annotations

import json
from typing import Any


def tool_call_arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of `messages` in which every assistant tool call's JSON-text `arguments` is parsed
    (None or "" becomes {}); other messages are shared, not copied. ValueError for arguments that are
    not JSON."""
    out = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not isinstance(calls, list):
            out.append(message)
            continue
        parsed_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                parsed_calls.append(call)
                continue
            arguments = function.get("arguments")
            if not arguments:
                arguments = {}
            elif isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as e:
                    raise ValueError(f"messages[{index}]: the arguments of tool call {call.get('id')!r} are not "
                                     f"valid JSON: {e}") from e
            parsed_calls.append({**call, "function": {**function, "arguments": arguments}})
        out.append({**message, "tool_calls": parsed_calls})
    return out
