"""Tool-call parsers: model output text -> OpenAI `tool_calls`, streamed or not (see `base.py`).

    parser = get_tool_parser("hermes")          # --tool-call-parser, for tool_choice="auto"
    parser = ConstrainedToolParser(constraint.function_name)   # tool_choice="required" or named
    parser.extract_tool_calls(text, request)    # -> ExtractedToolCalls(tools_called, tool_calls, content)
    stream = parser.stream(request); stream.feed(delta_text) / stream.finish()   # -> delta dict | None

`openai` (gpt-oss) reads no text: its harmony calls are read on token ids by `serve.harmony_chat`.
`parser.keeps_special_tokens`: the server must detokenize with `skip_special_tokens=False` when tools
are given and tool_choice is not "none" (the call markers are special tokens), as vLLM's parsers ask.
"""

from serve.tool_parsers.base import ExtractedToolCalls, ToolCallStream, make_tool_call_id
from serve.tool_parsers.constrained import ConstrainedToolParser
from serve.tool_parsers.hermes import HermesToolParser
from serve.tool_parsers.llama3_json import Llama3JsonToolParser
from serve.tool_parsers.mistral import MistralToolParser
from serve.tool_parsers.openai import OpenAIToolParser
from serve.tool_parsers.pythonic import PythonicToolParser

ToolParser = (HermesToolParser | Llama3JsonToolParser | MistralToolParser | PythonicToolParser | ConstrainedToolParser
              | OpenAIToolParser)

TOOL_PARSERS = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "openai": OpenAIToolParser,  # harmony, read on token ids: serve.harmony_chat
}


def get_tool_parser(name: str) -> ToolParser:
    """A parser for `--tool-call-parser NAME`; ValueError (listing the names) for an unknown one."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"invalid tool call parser: {name} (chose from {{ {', '.join(TOOL_PARSERS)} }})") from None


__all__ = [
    "TOOL_PARSERS",
    "ConstrainedToolParser",
    "ExtractedToolCalls",
    "ToolCallStream",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
]
