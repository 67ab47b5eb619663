"""Fuzzed request bodies on every POST endpoint (hypothesis): no 5xx, every 4xx is vLLM's error JSON, every
stream ends in `[DONE]`, and afterwards the server answers a greedy request as before with its KV pool free.

A body mixes valid-looking values of the fields `serve.protocol` knows with wrong types, out-of-range and
non-finite numbers, integer literals too long for Python's int parser, deep nesting, odd unicode (lone
surrogates included) and missing or empty fields; some bodies are not JSON objects, or not JSON at all.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import BaseModel

from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from tests.serve.conftest import API_KEY, MODEL_NAMES, LiveServer, pool_is_free, wait_until

VOCAB = 512  # stories260K's
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = "application/json"
GREEDY = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "seed": 3}


@dataclass(frozen=True)
class RawJSON:
    """Text written into the body as is: literals `json.dumps` cannot write (NaN, a 5,000-digit integer)."""

    text: str


def to_json(value: Any, *, ascii_only: bool) -> str:
    """JSON text; `ascii_only=False` writes characters raw (a lone surrogate then becomes invalid UTF-8)."""
    if isinstance(value, RawJSON):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key, ensure_ascii=ascii_only)}:{to_json(item, ascii_only=ascii_only)}"
                              for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item, ascii_only=ascii_only) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# ---- values ----

odd_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates, controls, U+2028 ...
token_ids = st.lists(st.integers(0, VOCAB - 1), max_size=12)
huge_ints = st.sampled_from([-1, 0, 2**31, -(2**31) - 1, 2**53 + 1, 2**63, -(2**63) - 1, 2**64]) | st.integers(
    -1000, 1000).map(lambda exponent: 10**exponent if exponent >= 0 else -(10**-exponent))
# NOTE: Python refuses to parse an integer literal of more than 4,300 digits.
long_integer_literals = st.integers(4290, 5000).map(lambda digits: "9" * digits) | st.just("-" + "1" * 4301)
raw_literals = (st.sampled_from(["NaN", "Infinity", "-Infinity", "1e39", "-1e39", "1e400", "-0.0", "5e-324"])
                | long_integer_literals).map(RawJSON)
deep_nesting = st.integers(50, 3000).map(lambda depth: RawJSON("[" * depth + "1" + "]" * depth))
json_leaves = (st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
               | odd_text)
nested_json = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)
# Around the live server's 64 KiB body limit: a 413, or a long prompt rendered off the event loop.
long_text = st.integers(60_000, 70_000).map(lambda size: "x" * size)
wild = (st.none() | st.booleans() | huge_ints | raw_literals | deep_nesting | odd_text | nested_json | long_text
        | st.just("") | st.just([]) | st.just({}) | st.floats())


def mostly(valid: st.SearchStrategy[Any], one_in: int = 4) -> st.SearchStrategy[Any]:
    """A wild value once in `one_in` draws, else `valid`."""
    return st.integers(0, one_in - 1).flatmap(lambda pick: valid if pick else wild)


def from_annotation(annotation: Any) -> st.SearchStrategy[Any]:
    """A well-typed value of a pydantic field annotation, kept small (integers -1 to 8, short lists)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([from_annotation(arg) for arg in args])
    if origin is typing.Annotated:
        return from_annotation(args[0])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(from_annotation(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), from_annotation(args[1]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.fixed_dictionaries({}, optional={name: from_annotation(field.annotation)
                                                   for name, field in annotation.model_fields.items()})
    simple: dict[Any, st.SearchStrategy[Any]] = {
        type(None): st.none(), bool: st.booleans(), int: st.integers(-1, 8), float: st.floats(-1, 2),
        str: st.text(max_size=10), Any: json_leaves,
    }
    return simple[annotation]


content_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=3)
messages = st.lists(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant"]))},
    optional={"content": mostly(st.text(max_size=30) | odd_text | content_parts), "name": st.text(max_size=5)}),
    min_size=1, max_size=3)
json_schema = st.sampled_from([{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                               {"type": "string", "maxLength": 4}, {"enum": ["x", "y"]}, {"type": "nonsense"}])
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["get", "f"]))}, optional={"parameters": mostly(json_schema)})})
tag_structure = st.fixed_dictionaries({"begin": mostly(st.just("<a>")), "schema": mostly(json_schema),
                                       "end": mostly(st.just("</a>"))})
structural_tag = st.fixed_dictionaries({"type": st.just("structural_tag")}, optional={
    "structures": mostly(st.lists(mostly(tag_structure), max_size=2)),
    "triggers": mostly(st.lists(mostly(st.just("<a")), max_size=2))})
structured = st.one_of(
    st.fixed_dictionaries({"choice": mostly(st.lists(st.text(min_size=1, max_size=5), max_size=3))}),
    st.fixed_dictionaries({"regex": mostly(st.sampled_from(["[a-z]+", "(", "a{2,3}"]))}),
    st.fixed_dictionaries({"json": mostly(json_schema)}),
    st.fixed_dictionaries({"grammar": mostly(st.sampled_from(['root ::= "a"', "root ::="]))}),
    st.fixed_dictionaries({"json_object": st.booleans()}),
    st.fixed_dictionaries({"structural_tag": mostly(structural_tag.map(lambda tag: to_json(tag, ascii_only=True)))}),
    st.dictionaries(st.sampled_from(["choice", "regex", "json", "grammar", "json_object"]), wild, max_size=3),
)
# Fields whose meaningful values the annotation does not say (a prompt the tokenizer reads, ids in the vocab).
SEMANTIC: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([*MODEL_NAMES, "other"]),
    "prompt": st.text(max_size=40) | token_ids | st.lists(token_ids, min_size=1, max_size=3)
    | st.lists(st.text(max_size=10), min_size=1, max_size=3),
    "messages": messages,
    "tokens": token_ids,
    "max_tokens": st.integers(0, 8),
    "max_completion_tokens": st.integers(0, 8),
    "n": st.integers(1, 3),
    "logprobs": st.booleans() | st.integers(0, 3),
    "top_logprobs": st.integers(0, 3),
    "prompt_logprobs": st.integers(-1, 3),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
    "allowed_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
    "stop_token_ids": token_ids,
    "logprob_token_ids": token_ids,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "bad_words": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "tools": st.lists(tool, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.just("get")})}),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": st.just("s"), "schema": mostly(json_schema)})}) | structural_tag,
    "structured_outputs": structured,
    "chat_template_kwargs": st.dictionaries(st.text(max_size=8), nested_json, max_size=2),
    "documents": st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=2), max_size=2),
}


def body_fields(*models: type[BaseModel]) -> dict[str, st.SearchStrategy[Any]]:
    """Every field of the models, each a valid-looking value (nested wild values included) or a wild one."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for model in models:
        for name, field in model.model_fields.items():
            fields[name] = SEMANTIC[name] if name in SEMANTIC else from_annotation(field.annotation)
    return {name: mostly(valid, one_in=8) for name, valid in fields.items()}


@st.composite
def bodies(draw: st.DrawFn, required: str, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A JSON object with a few of `fields`, `required` among them: valid (mostly), wild or missing."""
    names = draw(st.lists(st.sampled_from(sorted(fields.keys() - {required})), max_size=5, unique=True))
    body = {name: draw(fields[name]) for name in names}
    if draw(st.integers(0, 9)):
        body[required] = draw(mostly(SEMANTIC[required]))
    return body


COMPLETION = body_fields(CompletionRequest)
CHAT = body_fields(ChatCompletionRequest)
ENDPOINT_BODIES: dict[str, st.SearchStrategy[Any]] = {
    "/v1/completions": bodies("prompt", COMPLETION),
    "/v1/chat/completions": bodies("messages", CHAT),
    "/v1/chat/completions/batch": bodies("messages", CHAT).map(
        lambda body: {**body, "messages": [body["messages"]] * 2} if isinstance(body.get("messages"), list) else body),
    "/invocations": bodies("messages", CHAT) | bodies("prompt", COMPLETION),
    "/tokenize": bodies("prompt", body_fields(TokenizeCompletionRequest))
    | bodies("messages", body_fields(TokenizeChatRequest)),
    "/detokenize": bodies("tokens", body_fields(DetokenizeRequest)),
}
not_objects = st.sampled_from([b"", b"{", b"[1, 2]", b'"prompt"', b"null", b"\xff\xfe{}", b'{"prompt": "a",}'])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(path, body, content type): mostly JSON, sometimes not, with a JSON or another content type."""
    path = draw(st.sampled_from(sorted(ENDPOINT_BODIES)))
    if draw(st.integers(0, 19)):
        text = to_json(draw(ENDPOINT_BODIES[path]), ascii_only=draw(st.booleans()))
        body = text.encode("utf-8", "surrogatepass")
    else:
        body = draw(not_objects)
    other_types = st.sampled_from(["application/json; charset=utf-8", "text/plain"])
    content_type = JSON if draw(st.integers(0, 3)) else draw(other_types)
    return path, body, content_type


# ---- checks ----


def check_error(response: httpx.Response) -> None:
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == response.status_code and isinstance(error["message"], str), error


def check_stream(response: httpx.Response) -> None:
    payloads = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert payloads and payloads[-1] == "[DONE]", response.text[-500:]
    for payload in payloads[:-1]:
        event = json.loads(payload)
        if "error" in event:
            assert set(event["error"]) == {"message", "type", "param", "code"}, event


class ServerErrors(logging.Handler):
    """The server's logged exceptions during one request: a failing example shows their tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture()
def server_errors() -> Iterator[ServerErrors]:
    handler = ServerErrors()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture()
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis's caches (character tables, source constants) in a temporary directory, not the checkout's."""
    set_hypothesis_home_dir(tmp_path)
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)


def greedy_text(client: httpx.Client) -> str:
    response = client.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_fuzzed_bodies_never_5xx_and_leave_the_server_as_before(live: LiveServer, server_errors: ServerErrors,
                                                                 hypothesis_home: None) -> None:
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=20) as client:
        before = greedy_text(client)

        @settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=False,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(requests())
        # What earlier runs found: a batch's non-latin-1 request_id; a structural tag's non-string begin.
        @example(("/v1/chat/completions/batch",
                  b'{"messages": [[{"role": "user"}]], "request_id": "\\u20ac", "max_tokens": 2}', JSON))
        @example(("/v1/chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": 2, "response_format": '
                  b'{"type": "structural_tag", "triggers": ["<a"], "structures": [{"begin": false, "end": null}]}}',
                  JSON))
        def answers_well(request: tuple[str, bytes, str]) -> None:
            path, body, content_type = request
            server_errors.lines.clear()
            response = client.post(path, content=body, headers={"Content-Type": content_type})
            status = response.status_code
            assert status < 500, f"{path} {body[:300]!r} -> {status} {response.text[:300]}\n" + "\n".join(
                server_errors.lines)
            if status >= 400:
                check_error(response)
            elif response.headers["content-type"].startswith("text/event-stream"):
                check_stream(response)
            else:
                response.json()

        answers_well()
        wait_until(lambda: pool_is_free(live.ctx.engine))
        assert greedy_text(client) == before
