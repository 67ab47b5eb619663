"""Tool-call parsers on recorded model outputs: non-streaming results, and streamed deltas accumulated
(by hand and by the OpenAI SDK) equal to them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from serve.tool_parsers import ConstrainedToolParser, get_tool_parser
from tests.tools.streaming import accumulate, chunkings, run_stream, sdk_accumulate


@dataclass
class Case:
    name: str
    output: str
    calls: list[tuple[str, Any]] | None  # expected (name, arguments value); None: not a tool call
    content: str | None = None  # expected content when there are calls
    streams_equal: bool = True  # streaming gives the same result (see the parsers' docstrings when not)


HERMES = [
    Case("single", '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", '
         '"unit": "fahrenheit"}}\n</tool_call>',
         [("get_current_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"})]),
    Case("text_before", "I'll look that up for you.\n<tool_call>\n{\"name\": \"search\", \"arguments\": "
         "{\"query\": \"vLLM paged attention\"}}\n</tool_call>",
         [("search", {"query": "vLLM paged attention"})], "I'll look that up for you.\n"),
    Case("parallel", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
         [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    Case("unicode", '<tool_call>\n{"name": "translate", "arguments": {"text": "naïve café ☕ 東京", '
         '"escaped": "\\u00e9\\ud83d\\ude00\\n\\"q\\""}}\n</tool_call>',
         [("translate", {"text": "naïve café ☕ 東京", "escaped": 'é😀\n"q"'})]),
    Case("nested_numbers", '<tool_call>\n{"name": "query", "arguments": {"filters": {"price": {"max": 100.50, '
         '"min": 1e2}}, "tags": ["a", "b"], "limit": 5, "exact": false, "cursor": null, "empty": {}}}\n</tool_call>',
         [("query", {"filters": {"price": {"max": 100.5, "min": 100.0}}, "tags": ["a", "b"], "limit": 5,
                     "exact": False, "cursor": None, "empty": {}})]),
    Case("compact_json", '<tool_call>{"name":"f","arguments":{"a":[1,2],"b":{"c":"d"}}}</tool_call>',
         [("f", {"a": [1, 2], "b": {"c": "d"}})]),
    Case("arguments_first", '<tool_call>\n{"arguments": {"x": 1}, "name": "late_name"}\n</tool_call>',
         [("late_name", {"x": 1})]),
    Case("missing_closing_tag", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}',
         [("get_weather", {"city": "Oslo"})]),
    Case("text_after_calls", 'Sure.<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nDone!',
         [("f", {})], "Sure."),
    Case("plain_text", "The capital of France is Paris.", None),
    Case("truncated_json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None,
         streams_equal=False),
    Case("python_dict_not_json", "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>", None),
    Case("missing_arguments", '<tool_call>\n{"name": "f"}\n</tool_call>', None),
    Case("partial_tag_at_end", "Let me think <tool_ca", None),
]

LLAMA3_JSON = [
    Case("single", '{"name": "get_current_weather", "parameters": {"location": "San Francisco, CA", '
         '"unit": "celsius"}}', [("get_current_weather", {"location": "San Francisco, CA", "unit": "celsius"})]),
    Case("python_tag", '<|python_tag|>{"name": "brave_search", "parameters": {"query": "weather in Menlo Park"}}',
         [("brave_search", {"query": "weather in Menlo Park"})]),
    Case("parallel_semicolon", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "get_time", "arguments": {"tz": "CET"}}',
         [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    Case("unicode", '{"name": "say", "parameters": {"text": "Grüße aus Köln 🍺", "lang": "de"}}',
         [("say", {"text": "Grüße aus Köln 🍺", "lang": "de"})]),
    # vLLM drops the text before a call in non-streaming mode; streaming has already sent it.
    Case("text_before", 'Calling the tool now. {"name": "f", "parameters": {"x": 1}}', [("f", {"x": 1})],
         None, streams_equal=False),
    Case("plain_text_with_braces", "Use {placeholders} in the template.", None),
    Case("json_not_a_call", '{"answer": 42}', None),
    Case("truncated_json", '{"name": "get_weather", "parameters": {"city": "Par', None, streams_equal=False),
    Case("plain_text", "Hello! How can I help you today?", None),
]

MISTRAL = [
    Case("v03_array", '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
         '"format": "celsius"}}]', [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),
    Case("v03_parallel", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3.5, "b": 4}}, '
         '{"name": "mul", "arguments": {"a": 2, "b": 7}}]', [("add", {"a": 3.5, "b": 4}), ("mul", {"a": 2, "b": 7})]),
    Case("v11_name_args", '[TOOL_CALLS]get_weather{"location": "Nice"}[TOOL_CALLS]get_time{"tz": "CET"}',
         [("get_weather", {"location": "Nice"}), ("get_time", {"tz": "CET"})]),
    Case("v13_args_marker", '[TOOL_CALLS]get_weather[ARGS]{"location": "Zürich"}',
         [("get_weather", {"location": "Zürich"})]),
    Case("text_before", 'Let me check. [TOOL_CALLS][{"name": "f", "arguments": {}}]', [("f", {})], "Let me check. "),
    Case("plain_text", "Bonjour ! Comment puis-je vous aider ?", None),
    Case("truncated_json", '[TOOL_CALLS][{"name": "f", "arguments": {"x": ', None, streams_equal=False),
    Case("not_json_after_marker", "[TOOL_CALLS] I cannot call tools.", None),
]

PYTHONIC = [
    Case("single", '[get_weather(city="San Francisco", metric=True)]', [("get_weather", {"city": "San Francisco",
                                                                                     "metric": True})]),
    Case("parallel", "[get_weather(city='Paris'), get_time(timezone='Europe/Paris', exact=False)]",
         [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris", "exact": False})]),
    Case("literals_unicode", '[book(hotel="Hôtel ☆ (vue)", nights=2, price=-19.5, guests=[{"name": "Zoë", '
         '"age": 30}], extras=None, ok=true, note=null)]',
         [("book", {"hotel": "Hôtel ☆ (vue)", "nights": 2, "price": -19.5, "guests": [{"name": "Zoë", "age": 30}],
                    "extras": None, "ok": True, "note": None})]),
    Case("dotted_name", '[tools.search.web(q="a]b)c")]', [("tools.search.web", {"q": "a]b)c"})]),
    Case("plain_text", "It is sunny in Paris today.", None),
    Case("non_literal_argument", "[f(x=g(1))]", None),
    Case("list_of_numbers", "[1, 2, 3] are the first numbers.", None),
    Case("empty_list", "[]", None),
    Case("truncated", '[get_weather(city="Par', None),
    Case("text_after_list", "[f(a=1)] and then some", None, streams_equal=False),
]

RECORDED = {"hermes": HERMES, "llama3_json": LLAMA3_JSON, "mistral": MISTRAL, "pythonic": PYTHONIC}
ALL_CASES = [(parser, case) for parser, cases in RECORDED.items() for case in cases]
ID_PATTERNS = {"mistral": r"[A-Za-z0-9]{9}"}
DEFAULT_ID = r"chatcmpl-tool-[0-9a-f]{32}"


def _expected_calls(case: Case) -> list[tuple[str, str]]:
    return [(name, json.dumps(args, ensure_ascii=False)) for name, args in case.calls or []]


@pytest.mark.parametrize(("parser_name", "case"), ALL_CASES, ids=[f"{p}-{c.name}" for p, c in ALL_CASES])
def test_extract_tool_calls(parser_name: str, case: Case) -> None:
    result = get_tool_parser(parser_name).extract_tool_calls(case.output, {})
    if case.calls is None:
        assert (result.tools_called, result.tool_calls, result.content) == (False, [], case.output)
        return
    assert result.tools_called
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls] == _expected_calls(case)
    assert result.content == case.content
    for call in result.tool_calls:
        assert call["type"] == "function"
        assert re.fullmatch(ID_PATTERNS.get(parser_name, DEFAULT_ID), call["id"])
    assert len({c["id"] for c in result.tool_calls}) == len(result.tool_calls)


@pytest.mark.parametrize(("parser_name", "case"), ALL_CASES, ids=[f"{p}-{c.name}" for p, c in ALL_CASES])
def test_streaming_accumulates_to_the_non_streaming_result(parser_name: str, case: Case) -> None:
    parser = get_tool_parser(parser_name)
    expected = parser.extract_tool_calls(case.output, {})
    expected_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in expected.tool_calls]
    for pieces in chunkings(case.output):
        stream = parser.stream({})
        deltas = run_stream(stream, pieces)
        content, calls = accumulate(deltas)
        got_calls = [(c["name"], c["arguments"]) for c in calls]
        if case.streams_equal:
            assert (content, got_calls) == (expected.content, expected_calls), pieces
        if not calls:  # nothing was streamed as a call: no text may be lost
            assert content == (case.output or None)
        assert stream.tools_called == bool(calls)
        message = sdk_accumulate(deltas)
        assert message.content == content
        sdk_calls = [(tc.function.name, tc.function.arguments) for tc in message.tool_calls or []]
        assert sdk_calls == got_calls
        assert [tc.id for tc in message.tool_calls or []] == [c["id"] for c in calls]


@pytest.mark.parametrize("parser_name", list(RECORDED))
def test_tool_call_deltas_are_shaped_as_openai_streams_them(parser_name: str) -> None:
    case = next(c for c in RECORDED[parser_name] if c.calls and len(c.calls) == 2)
    deltas = run_stream(get_tool_parser(parser_name).stream({}), list(case.output))
    seen: set[int] = set()
    for delta in deltas:
        for tc in delta.get("tool_calls", []):
            if tc["index"] not in seen:  # the first delta of a call: id, type and the whole name, no arguments
                assert tc["index"] == len(seen)
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert set(tc["function"]) == {"name"}
                assert re.fullmatch(ID_PATTERNS.get(parser_name, DEFAULT_ID), tc["id"])
                seen.add(tc["index"])
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                assert tc["function"]["arguments"]
    assert seen == {0, 1}


@pytest.mark.parametrize("parser_name", list(RECORDED))
@pytest.mark.parametrize("request_form", ["dict", "object"])
def test_parallel_tool_calls_false_keeps_only_the_first_call(parser_name: str, request_form: str) -> None:
    case = next(c for c in RECORDED[parser_name] if c.calls and len(c.calls) == 2)
    request: Any = {"parallel_tool_calls": False}
    if request_form == "object":
        request = SimpleNamespace(**request)
    parser = get_tool_parser(parser_name)
    result = parser.extract_tool_calls(case.output, request)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls] == _expected_calls(case)[:1]
    for pieces in chunkings(case.output, range(2)):
        _, calls = accumulate(run_stream(parser.stream(request), pieces))
        assert [(c["name"], c["arguments"]) for c in calls] == _expected_calls(case)[:1]


@pytest.mark.parametrize("parser_name", list(RECORDED))
def test_no_output_prefix_makes_a_parser_raise_or_lose_text(parser_name: str) -> None:
    """Every truncation of every recorded output (what max_tokens can cut): never an exception; when no
    call comes out, the text is all in content."""
    parser = get_tool_parser(parser_name)
    for case in RECORDED[parser_name]:
        for end in range(len(case.output) + 1):
            text = case.output[:end]
            result = parser.extract_tool_calls(text, None)
            if not result.tools_called:
                assert result.content == text
            for pieces in chunkings(text, range(1)):
                content, calls = accumulate(run_stream(parser.stream(None), pieces))
                if not calls:
                    assert content == (text or None)


def test_unknown_parser_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral.*pythonic"):
        get_tool_parser("nonexistent")


CONSTRAINED = [
    (None, '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]',
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (None, '[ {"parameters": {"q": "ü"}, "name": "search"} ]', [("search", {"q": "ü"})]),
    ("get_weather", '{"city": "San Francisco", "days": 3}', [("get_weather", {"city": "San Francisco", "days": 3})]),
    ("get_weather", ' {\n  "city" : "Oslo"\n}', [("get_weather", {"city": "Oslo"})]),
]


@pytest.mark.parametrize(("function_name", "output", "calls"), CONSTRAINED)
def test_constrained_outputs_become_tool_calls(function_name: str | None, output: str, calls: list) -> None:
    parser = ConstrainedToolParser(function_name)
    result = parser.extract_tool_calls(output, {})
    expected = _expected_calls(Case("", output, calls))
    assert result.tools_called and result.content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls] == expected
    for pieces in chunkings(output):
        content, streamed = accumulate(run_stream(parser.stream({}), pieces))
        assert content is None
        assert [(c["name"], c["arguments"]) for c in streamed] == expected


def test_constrained_output_cut_short_stays_content() -> None:
    result = ConstrainedToolParser(None).extract_tool_calls('[{"name": "f", "parameters": {"a": ', {})
    assert (result.tools_called, result.content) == (False, '[{"name": "f", "parameters": {"a": ')
