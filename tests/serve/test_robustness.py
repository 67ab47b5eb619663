"""Odd client input found by probing a live server: each is a 400 (never a 500 or a dead engine), and the
server keeps serving with its KV pool free afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from serve.inputs import build_sampling_params
from serve.protocol import CompletionRequest
from tests.serve.conftest import LiveServer, pool_is_free, wait_until
from tests.serve.test_errors import CHAT, MESSAGES, error_of

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/v1/completions", CHAT, "/tokenize"])
def test_deeply_nested_json_is_400(http: httpx.Client, path: str) -> None:
    body = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert "nested too deeply" in error_of(http.post(path, content=body, headers=JSON), 400)["message"]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body", [
    {"messages": MESSAGES, "chat_template_kwargs": {"x": _nested(900)}},  # parses, then recursed in the template
    {"messages": [{**MESSAGES[0], "extra": _nested(900)}]},
    {"messages": MESSAGES, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": _nested(890)}}}}]},  # deepcopy recursed
])
def test_nesting_that_parses_but_is_too_deep_is_400(http: httpx.Client, live: LiveServer, body: Any) -> None:
    assert "nested too deeply" in error_of(http.post(CHAT, json={**body, "max_tokens": 2}), 400)["message"]
    ok = http.post(CHAT, json={"messages": MESSAGES, "chat_template_kwargs": {"x": _nested(100)}, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    wait_until(lambda: pool_is_free(live.ctx.engine))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", b'{"prompt": "hi \\ud800 there", "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    ("/tokenize", b'{"prompt": "\\ud800"}'),
])
def test_lone_surrogate_escape_is_400(http: httpx.Client, live: LiveServer, path: str, body: bytes) -> None:
    assert "surrogate" in error_of(http.post(path, content=body, headers=JSON), 400)["message"]
    # A surrogate pair (how json.dumps writes an emoji by default) is one valid character.
    ok = http.post(CHAT, content=b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}',
                   headers=JSON)
    assert ok.status_code == 200, ok.text
    wait_until(lambda: pool_is_free(live.ctx.engine))


def _params(vocab_size: int = 512, **fields: Any) -> Any:
    request = CompletionRequest.model_validate({"prompt": "a", **fields})
    return build_sampling_params(request, max_tokens=4, logprobs=request.logprobs,
                                 prompt_logprobs=request.prompt_logprobs, model_defaults={}, vocab_size=vocab_size)


def test_top_k_at_or_above_the_vocab_is_off() -> None:
    # The runner packs top_k into int32: 2**40 used to overflow there and kill the engine (and the server).
    assert _params(top_k=2**40).top_k == 0
    assert _params(top_k=512).top_k == 0
    assert _params(top_k=511).top_k == 511


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1000}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 50}, "logprobs"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_more_logprobs_than_the_max_is_400(http: httpx.Client, live: LiveServer, path: str, body: dict[str, Any],
                                           param: str) -> None:
    # vLLM's max_logprobs (20): the runner computes only that many, so more was silently cut to 20.
    error = error_of(http.post(path, json={**body, "max_tokens": 2}), 400)
    assert error["param"] == param and "max allowed: 20" in error["message"], error
    ok = http.post("/v1/completions", json={"prompt": "a", "logprobs": 20, "prompt_logprobs": 20, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    wait_until(lambda: pool_is_free(live.ctx.engine))
