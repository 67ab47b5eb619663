"""The incremental JSON re-serializer behind streamed tool-call arguments."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from serve.tool_parsers.json_stream import CanonicalJsonWriter


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    def text() -> str:
        return "".join(rng.choice('ab "\\/\n\t\x01é中😀{}[],:') for _ in range(rng.randint(0, 6)))

    roll = rng.random()
    if depth > 3 or roll < 0.35:
        return rng.choice([text(), rng.randint(-(10**20), 10**20), rng.uniform(-1e6, 1e6), 1e300, -0.0, True,
                           False, None])
    if roll < 0.7:
        return {text(): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def _feed_in_pieces(writer: CanonicalJsonWriter, text: str, rng: random.Random) -> int:
    consumed, i, outputs = 0, 0, []
    while i < len(text) and not writer.done and writer.error is None:
        n = rng.randint(1, 6)
        consumed += writer.feed(text[i : i + n])
        outputs.append(writer.output)
        i += n
    assert all(outputs[-1].startswith(o) for o in outputs)  # output only ever grows
    return consumed


@pytest.mark.parametrize("seed", range(4))
def test_output_is_json_dumps_of_the_parsed_value_for_any_spelling(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        value = {"name": "f", "arguments": _random_value(rng)}
        raw = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2, "\t"]),
                         separators=rng.choice([None, (",", ":"), (" ,  ", " : ")]))
        trailer = rng.choice(["", "\n</tool_call>", "; {"])
        writer = CanonicalJsonWriter()
        consumed = _feed_in_pieces(writer, raw + trailer, rng)
        assert writer.done and writer.error is None
        assert consumed == len(raw)  # stops right after the value
        assert writer.output == json.dumps(json.loads(raw), ensure_ascii=False)
        start, end = writer.members["arguments"]
        assert writer.output[start:end] == json.dumps(value["arguments"], ensure_ascii=False)


@pytest.mark.parametrize("bad", ['{"a": 01}', '{"a": tru}', '{"a" 1}', '{"a": 1,}', "[1,]", '{"a": "\x01"}',
                                 '{"a": "\\q"}', '{"a": [1}', '{"a": "\\u12G4"}', "{'a': 1}"])
def test_invalid_json_is_an_error_not_an_exception(bad: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad)
    writer = CanonicalJsonWriter()
    writer.feed(bad)
    assert writer.error is not None and not writer.done


def test_members_are_open_until_their_value_ends() -> None:
    writer = CanonicalJsonWriter()
    writer.feed('{"name": "get", "arguments": {"city": "Pa')
    assert writer.members["name"][1] is not None
    start, end = writer.members["arguments"]
    assert end is None and writer.output[start:] == '{"city": "Pa'
