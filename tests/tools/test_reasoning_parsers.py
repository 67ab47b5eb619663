"""Reasoning parsers: `<think>` splits, non-streaming and streamed (accumulated), with vLLM's semantics."""

from __future__ import annotations

import pytest

from serve.reasoning_parsers import get_reasoning_parser
from tests.tools.streaming import chunkings

THOUGHT = "<think>\nThe user wants 2 + 2. That is 4.\n</think>\n\nThe answer is **4**."
# (output, deepseek_r1 / qwen3 with thinking on -> (reasoning, content))
CASES = [
    (THOUGHT, ("\nThe user wants 2 + 2. That is 4.\n", "\n\nThe answer is **4**.")),
    # the template put <think> in the prompt: the output starts inside the reasoning
    ("Counting the letters: s-t-r-a-w.\n</think>\n\nThere are 3.", ("Counting the letters: s-t-r-a-w.\n",
                                                                     "\n\nThere are 3.")),
    ("<think>Ends right after the thought.</think>", ("Ends right after the thought.", None)),
    ("<think></think>Straight to the answer.", ("", "Straight to the answer.")),
    ("<think>Cut off by max_tokens, no end ta", ("Cut off by max_tokens, no end ta", None)),
    ("Mentions </thin and <think that are not tags</think>ok", ("Mentions </thin and <think that are not tags",
                                                                  "ok")),
    ("思考中… 🤔</think>答案：四", ("思考中… 🤔", "答案：四")),
    ("", ("", None)),
]
QWEN_TOOL_CALL = "I should call the tool.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"


def _streamed(parser, text: str, pieces: list[str]) -> tuple[str | None, str | None]:
    stream = parser.stream()
    reasoning = content = ""
    for delta in [stream.feed(p) for p in pieces] + [stream.finish()]:
        if delta:
            reasoning += delta.get("reasoning", "")
            content += delta.get("content", "")
    return reasoning or None, content or None


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize(("output", "expected"), CASES)
def test_think_block_split_streamed_and_not(name: str, output: str, expected: tuple) -> None:
    parser = get_reasoning_parser(name)
    assert parser.extract_reasoning(output) == expected
    for pieces in chunkings(output):
        assert _streamed(parser, output, pieces) == (expected[0] or None, expected[1])


@pytest.mark.parametrize("output", [THOUGHT, "Plain answer without thinking.", "a </think> b"])
def test_qwen3_with_thinking_disabled_is_all_content(output: str) -> None:
    parser = get_reasoning_parser("qwen3", {"enable_thinking": False})
    assert parser.extract_reasoning(output) == (None, output)
    for pieces in chunkings(output):
        assert _streamed(parser, output, pieces) == (None, output)


def test_qwen3_xml_tool_call_ends_the_reasoning_but_a_mention_does_not() -> None:
    qwen3, deepseek = get_reasoning_parser("qwen3"), get_reasoning_parser("deepseek_r1")
    at = QWEN_TOOL_CALL.index("<tool_call>")
    expected = (QWEN_TOOL_CALL[:at], QWEN_TOOL_CALL[at:])
    assert qwen3.extract_reasoning(QWEN_TOOL_CALL) == expected
    assert deepseek.extract_reasoning(QWEN_TOOL_CALL) == (QWEN_TOOL_CALL, None)
    mention = "The format is <tool_call> followed by JSON, but I will just answer."
    assert qwen3.extract_reasoning(mention) == (mention, None)
    for text, want in [(QWEN_TOOL_CALL, expected), (mention, (mention, None))]:
        for pieces in chunkings(text):
            assert _streamed(qwen3, text, pieces) == want


def test_unknown_reasoning_parser_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        get_reasoning_parser("o1")
