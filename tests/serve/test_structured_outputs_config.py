"""--structured-outputs-config reaches both places that compile a grammar, as in vLLM 0.34.0's guidance backend:
the server's own check (its 400 comes before a stream starts) and the engine's compiler (what it decodes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jaxllm.config import StructuredOutputsConfig
from tests.serve.conftest import MODEL_NAMES, LiveServer, make_context, new_engine

MESSAGES = [{"role": "user", "content": "Once upon a time"}]
STRICT = StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True, disable_additional_properties=True)


@pytest.fixture(scope="module")
def strict(stories_tokenizer: Any, story_script: list[int]) -> Iterator[httpx.Client]:
    engine = new_engine(stories_tokenizer, story_script, structured_outputs=STRICT)
    with LiveServer(make_context(engine)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        yield http


def _body(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAMES[0], "messages": MESSAGES, "max_tokens": 32, **extra,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


def test_the_engine_decodes_compact_json_without_undeclared_keys(strict: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}}  # nothing required
    choice = strict.post("/v1/chat/completions", json=_body(schema)).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] in ("{}", '{"mood":"happy"}', '{"mood":"sad"}'), choice


def test_the_servers_check_closes_objects_too(strict: httpx.Client) -> None:
    # Satisfiable only through an undeclared key: with disable_additional_properties it cannot be met.
    schema = {"type": "object", "properties": {"mood": {"type": "string"}}, "required": ["name"]}
    reply = strict.post("/v1/chat/completions", json=_body(schema, stream=True))
    assert reply.status_code == 400  # before the stream: the server's own compile refused it
    error = reply.json()["error"]
    assert "required property 'name' is unsatisfiable" in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "response_format", 400)
