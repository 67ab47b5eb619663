"""vLLM 0.34's extra routes, headers and paths over raw HTTP: /invocations, /load, /tokenizer_info,
/v1/chat/completions/batch, the ORCA load header, X-Request-Id, --root-path, and JSON 404/405."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import API_KEY, LiveServer, make_context, new_engine, sse_events, wait_until
from tests.serve.test_errors import error_of

CHAT = "/v1/chat/completions"
BATCH = "/v1/chat/completions/batch"
MESSAGES = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def flagged(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    """A server with vLLM's optional endpoints and headers on, under the root path /llm, slow enough (5 ms a
    step) that a stream is still in flight after its first chunk."""
    ctx = make_context(new_engine(stories_tokenizer, story_script, delay_s=0.005), api_key=[API_KEY],
                       root_path="/llm", enable_request_id_headers=True, enable_server_load_tracking=True,
                       enable_tokenizer_info_endpoint=True)
    with LiveServer(ctx) as server:
        yield server


def test_unknown_routes_and_methods_are_json_errors(http: httpx.Client) -> None:
    error = error_of(http.get("/no/such/route"), 404)
    assert error == {"message": "Not Found", "type": "Not Found", "param": None, "code": 404}
    response = http.get(CHAT)
    error = error_of(response, 405)
    assert error["message"] == "Method Not Allowed" and error["type"] == "Method Not Allowed"
    assert response.headers["allow"] == "POST"


def test_optional_endpoints_without_their_flags(http: httpx.Client) -> None:
    assert http.get("/load").json() == {"server_load": 0}  # vLLM's route is always there; nothing counts
    error_of(http.get("/tokenizer_info"), 404)
    assert "x-request-id" not in http.get("/health").headers


def test_invocations_routes_by_the_body_shape(http: httpx.Client, live: LiveServer) -> None:
    chat = http.post("/invocations", json={"messages": MESSAGES, "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    completion = http.post("/invocations", json={"prompt": "Once", "max_tokens": 3})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    error = error_of(http.post("/invocations", json={"input": "Once"}), 400)
    assert error["message"] == ("Cannot find suitable handler for request. Expected one of: "
                                "['ChatCompletionRequest', 'CompletionRequest']")
    assert error_of(http.post("/invocations", json={"messages": "Hi"}), 400)["param"] == "messages"
    with httpx.Client(base_url=live.url) as anon:
        error_of(anon.post("/invocations", json={"prompt": "Once"}), 401)
        assert anon.get("/ping").status_code == 200 and anon.post("/ping").status_code == 200


def test_batch_chat_one_choice_per_conversation(http: httpx.Client) -> None:
    conversations = [MESSAGES, [{"role": "user", "content": "Tell me a story about a cat"}]]
    singles = [http.post(CHAT, json={"messages": m, "max_tokens": 4, "seed": 3}).json() for m in conversations]
    batch = http.post(BATCH, json={"messages": conversations, "max_tokens": 4, "seed": 3, "request_id": "b1",
                                   "stream": True})
    assert batch.status_code == 200 and batch.headers["content-type"] == "application/json"
    body = batch.json()
    assert body["id"] == "chatcmpl-b1" and body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [s["choices"][0]["message"]["content"]
                                                                   for s in singles]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][key] == sum(s["usage"][key] for s in singles)


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"), ({"use_beam_search": True}, "use_beam_search"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"messages": MESSAGES}, "messages"), ({"messages": []}, "messages"), ({"temperature": "hot"}, "temperature"),
])
def test_batch_chat_refusals_name_the_field(http: httpx.Client, extra: dict[str, Any], param: str) -> None:
    assert error_of(http.post(BATCH, json={"messages": [MESSAGES], **extra}), 400)["param"] == param


def test_orca_load_report_on_request(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2}
    text = http.post(CHAT, json=body, headers={"endpoint-load-metrics-format": "TEXT"}).headers
    assert re.fullmatch(r"TEXT named_metrics\.num_requests_waiting=\d+\.\d+, named_metrics\.kv_cache_usage_perc="
                        r"[\d.e-]+", text["endpoint-load-metrics"])
    report = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2},
                       headers={"endpoint-load-metrics-format": "json"}).headers["endpoint-load-metrics"]
    assert report.startswith("JSON ")
    assert set(json.loads(report[len("JSON "):])["named_metrics"]) == {"num_requests_waiting", "kv_cache_usage_perc"}
    for headers in ({}, {"endpoint-load-metrics-format": "XML"}):
        assert "endpoint-load-metrics" not in http.post(CHAT, json=body, headers=headers).headers
    streamed = http.post(CHAT, json={**body, "stream": True}, headers={"endpoint-load-metrics-format": "TEXT"})
    assert "endpoint-load-metrics" not in streamed.headers


def test_bad_logit_bias_keys_are_named(http: httpx.Client) -> None:
    error = error_of(http.post(CHAT, json={"messages": MESSAGES, "logit_bias": {"x": 1, "5": 2, "y z": 1}}), 400)
    assert error["param"] == "logit_bias"
    assert error["message"] == ("logit_bias contains key(s) that cannot be converted to integer token IDs: "
                                "['x', 'y z']")


@pytest.mark.parametrize("prefix", ["/llm", ""])
def test_root_path_served_with_and_without_the_prefix(flagged: LiveServer, prefix: str) -> None:
    with httpx.Client(base_url=flagged.url + prefix) as anon:
        assert anon.get("/v1/models", headers=AUTH).status_code == 200
        error_of(anon.get("/v1/models"), 401)  # auth still guards /v1 below the root path
        assert anon.get("/health").status_code == 200
        error_of(anon.get("/v1/nothing", headers=AUTH), 404)


def test_request_id_headers(flagged: LiveServer) -> None:
    with httpx.Client(base_url=flagged.url) as anon:
        assert anon.get("/health", headers={"X-Request-Id": "mine-1"}).headers["x-request-id"] == "mine-1"
        assert re.fullmatch(r"[0-9a-f]{32}", anon.get("/health").headers["x-request-id"])
        assert anon.get("/v1/models").headers["x-request-id"]  # on errors too (a 401 here)
        chat = anon.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2}, headers={**AUTH, "X-Request-Id": "r7"})
        assert chat.headers["x-request-id"] == "r7" and chat.json()["id"] == "chatcmpl-r7"


def test_tokenizer_info(flagged: LiveServer, stories_tokenizer: Any) -> None:
    with httpx.Client(base_url=flagged.url) as anon:
        info = anon.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(stories_tokenizer).__name__
    assert info["bos_token"] == "<s>" and info["model_max_length"] == stories_tokenizer.model_max_length
    assert "vocab_file" not in info and "merges_file" not in info


def test_load_counts_generation_requests_in_flight(flagged: LiveServer) -> None:
    with httpx.Client(base_url=flagged.url, headers=AUTH, timeout=30) as http:
        assert http.get("/load").json() == {"server_load": 0}
        with http.stream("POST", CHAT, json={"messages": MESSAGES, "max_tokens": 200, "stream": True}) as stream:
            lines = stream.iter_lines()  # NOTE: held, as its garbage collection would close the connection
            assert sse_events([next(lines)])
            assert http.get("/load").json() == {"server_load": 1}
        wait_until(lambda: http.get("/load").json() == {"server_load": 0})
        assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200
        wait_until(lambda: http.get("/load").json() == {"server_load": 0})
