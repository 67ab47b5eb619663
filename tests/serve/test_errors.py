"""Every error over raw HTTP: vLLM's `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from jaxllm.engine.async_engine import AsyncEngine
from tests.serve.conftest import API_KEY, LiveServer, make_context, pool_is_free, wait_until
from tests.serve.fake_engine import new_llm_engine

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_malformed_json_is_400(http: httpx.Client) -> None:
    error = error_of(http.post(CHAT, content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in error["message"] and error["type"] == "BadRequestError"
    error_of(http.post(CHAT, json=["not", "an", "object"]), 400)


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "many"), ("temperature", "hot"), ("messages", "hello"), ("stream", {"a": 1}), ("n", 1.5),
    ("stop", 7), ("logit_bias", {"x": 1}),
])
def test_wrong_typed_known_field_is_400_naming_it(http: httpx.Client, field: str, value: Any) -> None:
    error = error_of(http.post(CHAT, json={"messages": MESSAGES, field: value}), 400)
    assert error["param"] == field and field in error["message"]


def test_sampling_param_value_error_names_the_field(http: httpx.Client) -> None:
    for field, value in [("n", 0), ("top_p", 0.0), ("temperature", -1.0), ("min_tokens", -2)]:
        error = error_of(http.post(CHAT, json={"messages": MESSAGES, field: value, "max_tokens": 4}), 400)
        assert error["param"] == field


def test_unknown_fields_are_ignored_with_a_log_line(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jaxllm.serve"):
        response = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, "frobnicate": True})
    assert response.status_code == 200
    assert any("frobnicate" in r.getMessage() for r in caplog.records)


def test_context_overflow_has_vllms_wording(http: httpx.Client, live: LiveServer) -> None:
    max_len = live.ctx.engine.info.max_model_len
    long_prompt = [100 + i % 300 for i in range(max_len + 5)]
    error = error_of(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}), 400)
    assert error["message"].startswith(
        f"This model's maximum context length is {max_len} tokens. However, you requested 4 output tokens and "
        f"your prompt contains at least {len(long_prompt)} input tokens")
    assert error["param"] == "input_tokens"
    error = error_of(http.post(CHAT, json={"messages": MESSAGES, "max_completion_tokens": max_len}), 400)
    assert f"you requested {max_len} output tokens" in error["message"]
    assert error["param"] == "max_completion_tokens"
    error = error_of(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": max_len + 1}), 400)
    assert error["param"] == "max_tokens"


def test_min_tokens_beyond_the_resolved_budget_is_400(http: httpx.Client, live: LiveServer) -> None:
    # No max_tokens: the budget is the rest of the context, known only against the prompt.
    too_many = 10 * live.ctx.engine.info.max_model_len
    error = error_of(http.post(CHAT, json={"messages": MESSAGES, "min_tokens": too_many}), 400)
    assert error["param"] == "min_tokens" and "min_tokens must be less than or equal to max_tokens" in error["message"]


def test_a_bad_prompt_among_several_sends_none_of_them(http: httpx.Client, live: LiveServer) -> None:
    before = dict(live.ctx.engine.metrics().request_success_total)
    error = error_of(http.post("/v1/completions", json={"prompt": [[5, 6, 7], [5, 99999]], "max_tokens": 4}), 400)
    assert error["param"] == "prompt"
    wait_until(lambda: pool_is_free(live.ctx.engine))
    assert live.ctx.engine.metrics().request_success_total == before  # nothing was run, nor aborted


def test_unknown_model_is_404(http: httpx.Client) -> None:
    error = error_of(http.post(CHAT, json={"model": "gpt-4", "messages": MESSAGES}), 404)
    assert error["param"] == "model" and error["type"] == "NotFoundError" and "gpt-4" in error["message"]
    error_of(http.get("/v1/models/gpt-4"), 404)


def test_auth_on_v1_only_with_constant_time_compare(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            error = error_of(anon.get("/v1/models", headers=headers), 401)
            assert error["type"] == "AuthenticationError"
        assert anon.post(CHAT, json={"messages": MESSAGES}).status_code == 401
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        for path in ("/health", "/version", "/metrics"):
            assert anon.get(path).status_code == 200, path


def test_body_over_the_limit_is_413(http: httpx.Client, live: LiveServer) -> None:
    limit = live.ctx.args.max_request_body_bytes
    big = {"messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    error_of(http.post(CHAT, json=big), 413)

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(limit // 1000 + 2):
            yield b"y" * 1000
        yield b'"}]}'

    error_of(http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"}), 413)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "bad_words": ["b", "  "]}, "bad_words"),
    (CHAT, {"messages": MESSAGES, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": MESSAGES, "tools": [{"function": {"description": "no name"}}]}, "tools"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "null"}}}}}}], "tool_choice": "required"}, "tools"),
    (CHAT, {"messages": MESSAGES, "tools": []}, "tools"),
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "a+", "choice": ["a"]}},
     "structured_outputs"),
    (CHAT, {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages"),
    (CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
    (CHAT, {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, "chat_template"),
])
def test_unsupported_or_invalid_requests_are_clear_400s(http: httpx.Client, path: str, body: dict[str, Any],
                                                        param: str) -> None:
    assert error_of(http.post(path, json=body), 400)["param"] == param


def test_auto_tool_choice_needs_the_flags_and_none_needs_nothing(http: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    error = error_of(http.post(CHAT, json={"messages": MESSAGES, "tools": tools, "tool_choice": "auto"}), 400)
    assert "--enable-auto-tool-choice and --tool-call-parser" in error["message"]
    response = http.post(CHAT, json={"messages": MESSAGES, "tools": tools, "tool_choice": "none", "max_tokens": 2,
                                     "response_format": {"type": "text"}})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["tool_calls"] == []


@pytest.mark.parametrize(("path", "extra"), [
    (CHAT, {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "Once"}),
])
@pytest.mark.parametrize(("field", "value", "construct"), [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ("structured_outputs", {"json": {"type": "object", "not": {"required": ["a"]}}}, "not"),
    ("structured_outputs", {"regex": "(unclosed"}, "unclosed group"),
])
def test_an_unsupported_constraint_is_a_400_naming_the_construct(http: httpx.Client, path: str, extra: dict[str, Any],
                                                                 field: str, value: Any, construct: str) -> None:
    error = error_of(http.post(path, json={**extra, field: value, "max_tokens": 4}), 400)
    assert error["param"] == field and construct in error["message"], error


def test_errors_never_take_the_server_down(http: httpx.Client, live: LiveServer) -> None:
    for _ in range(3):
        error_of(http.post(CHAT, content=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400)
        error_of(http.post("/v1/completions", json={"prompt": {"nested": True}}), 400)
    assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200
    wait_until(lambda: pool_is_free(live.ctx.engine))


def test_tokenize_and_detokenize(http: httpx.Client, stories_tokenizer: Any, live: LiveServer) -> None:
    out = http.post("/tokenize", json={"prompt": "Once upon a time", "return_token_strs": True}).json()
    assert out["tokens"] == stories_tokenizer.encode("Once upon a time") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == live.ctx.engine.info.max_model_len and out["token_strs"][0] == "<s>"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Once upon a time"}]}).json()
    assert chat["tokens"] == out["tokens"]  # the template writes BOS; no second one is added
    assert http.post("/detokenize", json={"tokens": out["tokens"][1:]}).json() == {"prompt": "Once upon a time"}
    error_of(http.post("/detokenize", json={"tokens": [10**7]}), 400)
    error_of(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)


def test_engine_death_gives_500_to_in_flight_requests_and_503_health(stories_tokenizer: Any,
                                                                     story_script: list[int]) -> None:
    llm_engine = new_llm_engine(stories_tokenizer, story_script, delay_s=0.02)
    runner, engine = llm_engine.runner, AsyncEngine(llm_engine)
    with LiveServer(make_context(engine)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        with http.stream("POST", CHAT, json={"messages": MESSAGES, "max_tokens": 400, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the role chunk: it is running
            runner.fail_at_step = runner.num_steps + 2
            rest = [line for line in lines if line.startswith("data:")]
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == 500 and rest[-1] == "data: [DONE]"
        error = error_of(http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 4}), 500)
        assert "engine" in error["message"]
        assert http.get("/health").status_code == 503
        assert http.get("/v1/models").status_code == 200  # the rest of the server still answers
