"""The server's wiring of constrained decoding, over the stand-in engine (whose runner takes the first token
the grammar allows at or after its script's): `response_format`, `structured_outputs`, forced tool calls,
streamed and not. Random-weight guarantees with the real engine: tests/e2e/test_structured_cpu.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

import serve.inputs
from tests.serve.conftest import (
    API_KEY,
    MODEL_NAMES,
    LiveServer,
    make_context,
    new_engine,
    pool_is_free,
    sse_events,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "Once upon a time"}]
MOOD = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "hops": {"enum": [1, 2]}},
        "required": ["mood", "hops"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "feel", "parameters": MOOD}},
         {"type": "function", "function": {"name": "rest", "parameters": {
             "type": "object", "properties": {"where": {"enum": ["bed", "sofa"]}}, "required": ["where"],
             "additionalProperties": False}}}]


@pytest.fixture()
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)


def chat_text(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str]:
    if not stream:
        choice = client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, max_tokens=200,
                                                **kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, max_tokens=200,
                                                 stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object(client: openai.OpenAI, stream: bool) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD}}
    text, finish = chat_text(client, stream, response_format=schema)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), MOOD)
    text, _ = chat_text(client, stream, response_format={"type": "json_object"})
    assert text.startswith("{")  # the story script never writes one: the grammar did


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_field_on_completions(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL_NAMES[0], prompt=["Once", "Lily"], max_tokens=200, n=2, stream=stream)
    for spec, holds in [({"choice": ["cat", "dog"]}, lambda t: t in ("cat", "dog")),
                        ({"regex": "[a-c]{3}!"}, lambda t: len(t) == 4 and set(t[:3]) <= set("abc") and t[3] == "!"),
                        ({"json": MOOD}, lambda t: jsonschema.validate(json.loads(t), MOOD) is None)]:
        out = client.completions.create(extra_body={"structured_outputs": spec}, **kwargs)
        texts: dict[int, str] = {}
        for chunk in out if stream else [out]:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert len(texts) == 4 and all(holds(t) for t in texts.values()), (spec, texts)


def test_requests_without_a_constraint_compile_nothing(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise ValueError("compile_grammar was called")  # a 400 from the server

    monkeypatch.setattr(serve.inputs, "compile_grammar", refuse)
    tools = [TOOLS[0]]
    for extra in ({}, {"response_format": {"type": "text"}}, {"tools": tools, "tool_choice": "none"}):
        out = client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, max_tokens=4, **extra)
        assert out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="compile_grammar was called"):  # a constrained one does
        client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_object"})


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls(client: openai.OpenAI, stream: bool) -> None:
    def call(**kwargs: Any) -> Any:
        if not stream:
            return client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, tools=TOOLS,
                                                  max_tokens=200, **kwargs).choices[0]
        with client.chat.completions.stream(model=MODEL_NAMES[0], messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                            **kwargs) as events:
            return events.get_final_completion().choices[0]

    required = call(tool_choice="required", parallel_tool_calls=False)  # the script would go on listing calls
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    assert not required.message.content
    for tool_call in required.message.tool_calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == tool_call.function.name)
        jsonschema.validate(json.loads(tool_call.function.arguments), schema)
    named = call(tool_choice={"type": "function", "function": {"name": "rest"}})
    assert named.finish_reason == "stop" and [c.function.name for c in named.message.tool_calls] == ["rest"]
    assert json.loads(named.message.tool_calls[0].function.arguments)["where"] in ("bed", "sofa")


def test_a_grammar_the_engine_cannot_compile_is_a_400_or_an_sse_error_event(stories_tokenizer: Any,
                                                                            story_script: list[int]) -> None:
    """The server's own compile passes, the engine's (in its pool, off its loop) fails: a whole reply is a 400
    naming the field, a stream (its 200 sent) an error event and [DONE]; the server keeps serving."""
    def refuse(params: Any) -> Any:
        raise ValueError("the engine's grammar backend refused it")

    engine = new_engine(stories_tokenizer, story_script, grammar_compiler=refuse)
    body = {"model": MODEL_NAMES[0], "messages": MESSAGES, "max_tokens": 8, "response_format": {"type": "json_object"}}
    with LiveServer(make_context(engine)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        whole = http.post("/v1/chat/completions", json=body)
        assert whole.status_code == 400 and "refused it" in whole.json()["error"]["message"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = sse_events(streamed.iter_lines())
        assert len(events) == 2 and events[-1] == "[DONE]"  # no role chunk: the engine gave no output
        error = events[0]["error"]
        assert "refused it" in error["message"] and (error["code"], error["param"]) == (400, "response_format")
        ok = http.post("/v1/chat/completions", json={**body, "response_format": None})
        assert ok.status_code == 200, ok.text
        wait_until(lambda: pool_is_free(engine))
