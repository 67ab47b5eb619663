"""`use_beam_search` on /v1/completions and /v1/chat/completions, over the fake engine, as vLLM 0.34.0 serves it.

The fake runner's top logprobs are the token it samples (greedy: its scripted one), then the next ids, each less
likely by FAKE_LOGPROB_STEP: at temperature 0 the best beam is the greedy text, the others branch off it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.engine.fake_runner import FAKE_LOGPROB_STEP
from tests.serve.conftest import (
    API_KEY,
    MODEL_NAMES,
    STORY,
    LiveServer,
    make_context,
    new_engine,
    pool_is_free,
    sse_events,
    wait_until,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_chat_beam_search_returns_n_beams_best_first(http: httpx.Client, live: LiveServer) -> None:
    engine = live.ctx.engine
    messages = [{"role": "user", "content": STORY}]  # a prompt of more than one KV page
    greedy = http.post(CHAT, json={"messages": messages, "max_tokens": 4, "temperature": 0}).json()
    hits_before = engine.metrics().prefix_cache_hits_total
    reply = http.post(CHAT, json={"messages": messages, "max_tokens": 4, "n": 3, "use_beam_search": True,
                                  "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert reply.status_code == 200
    body = reply.json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" and c["stop_reason"] is None for c in choices)
    assert choices[0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert len({c["message"]["content"] for c in choices}) == 3
    # Each beam's chosen logprobs sum to its score: the best took the likeliest token at every step.
    sums = [sum(p["logprob"] for p in c["logprobs"]["content"]) for c in choices]
    assert sums[0] == pytest.approx(4 * FAKE_LOGPROB_STEP) and sums == sorted(sums, reverse=True)
    assert body["usage"]["completion_tokens"] == 12
    # Each of the 3 steps after the first ran 3 beams, each on the prompt's full pages from the cache.
    full_pages = body["usage"]["prompt_tokens"] // 16
    assert full_pages >= 1
    assert engine.metrics().prefix_cache_hits_total - hits_before >= 9 * 16 * full_pages


def test_completion_beam_search_gives_n_choices_per_prompt(http: httpx.Client) -> None:
    body = http.post("/v1/completions", json={"prompt": ["Lily", "Once upon"], "max_tokens": 3, "n": 2,
                                              "use_beam_search": True, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for prompt, first in (("Lily", 0), ("Once upon", 2)):
        greedy = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
        assert body["choices"][first]["text"] == greedy["choices"][0]["text"]
        assert body["choices"][first + 1]["text"] != greedy["choices"][0]["text"]


def test_beams_grow_by_allowed_token_ids_only(http: httpx.Client, story_script: list[int]) -> None:
    allowed = sorted(set(story_script))[:2]
    body = http.post("/v1/completions", json={"prompt": "Lily", "max_tokens": 2, "n": 4, "use_beam_search": True,
                                              "temperature": 0, "allowed_token_ids": allowed,
                                              "return_token_ids": True}).json()
    paths = [tuple(c["token_ids"]) for c in body["choices"]]
    assert sorted(paths) == sorted((a, b) for a in allowed for b in allowed)  # width 4: all 4 paths


def test_chat_beam_search_streams_its_final_beams(live: LiveServer, http: httpx.Client) -> None:
    """vLLM streams a chat beam search as one final output: the roles, then each beam whole."""
    body = {"messages": MESSAGES, "max_tokens": 4, "n": 2, "use_beam_search": True, "temperature": 0}
    whole = http.post(CHAT, json=body).json()
    with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"])
              for e in events[:-1]]
    assert deltas == [(0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None)
                      ] + [(i, {"content": c["message"]["content"]}, "length") for i, c in enumerate(whole["choices"])]


@pytest.fixture(scope="module")
def eos_live(stories_tokenizer: Any) -> Iterator[LiveServer]:
    """A model that always writes token 100, with 101 (its second likeliest) as EOS."""
    with LiveServer(make_context(new_engine(stories_tokenizer, [100], eos_token_ids=(101,)))) as server:
        yield server


@pytest.mark.parametrize(("length_penalty", "include_stop", "choice"), [
    # Scores: [100, 100] -0.5 / 2, [EOS] -0.5 / 1, [100, EOS] -0.75 / 2: the live beam wins.
    (1.0, False, {"token_ids": [100, 100], "finish_reason": "length", "stop_reason": None}),
    # Scores: [100, 100] -0.5 * 2, [EOS] -0.5 * 1: the short beam, ended by EOS, wins.
    (-1.0, False, {"token_ids": [], "finish_reason": "stop", "stop_reason": 101}),
    (-1.0, True, {"token_ids": [101], "finish_reason": "stop", "stop_reason": 101}),
])
def test_length_penalty_and_eos(eos_live: LiveServer, length_penalty: float, include_stop: bool,
                                choice: dict[str, Any]) -> None:
    body = {"prompt": "Lily", "max_tokens": 2, "use_beam_search": True, "length_penalty": length_penalty,
            "include_stop_str_in_output": include_stop, "temperature": 0, "return_token_ids": True}
    with httpx.Client(base_url=eos_live.url) as http:
        (got,) = http.post("/v1/completions", json=body).json()["choices"]
    assert {key: got[key] for key in choice} == choice


def test_openai_sdk_beam_search(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model=MODEL_NAMES[0], messages=MESSAGES, max_tokens=3, n=2,
                                           extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="Streaming is not currently supported with beam search"):
        client.completions.create(model=MODEL_NAMES[0], prompt="Lily", n=2, stream=True,
                                  extra_body={"use_beam_search": True})


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("/v1/completions", {"prompt": "Lily", "stream": True}, None, "Streaming is not currently supported with beam"),
    ("/v1/completions", {"prompt": "Lily", "echo": True, "logprobs": 1}, "echo", "`echo` with `logprobs`"),
    (CHAT, {"messages": MESSAGES, "n": 11}, "n", "greater than max allowed: 20"),  # 2 * n logprobs a step
    (CHAT, {"messages": MESSAGES, "max_tokens": 1000}, "max_tokens", "maximum context length is 512"),
    # vLLM's server drops a constraint from a beam search; jaxllm says it cannot honour it.
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ("/v1/completions", {"prompt": "Lily", "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs",
     "Beam search with structured outputs"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "logprob_token_ids": [5]}, "logprob_token_ids",
     "`logprob_token_ids` is not supported with beam search."),
])
def test_beam_search_400s(http: httpx.Client, path: str, body: dict[str, Any], param: str | None,
                          message: str) -> None:
    reply = http.post(path, json={"max_tokens": 4, **body, "use_beam_search": True})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"]


@pytest.fixture(scope="module")
def slow_live(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    """Engine steps of 0.2 s over a pool of two pages: two beams of a step run while the third waits."""
    engine = new_engine(stories_tokenizer, story_script, delay_s=0.2, num_pages=2)
    with LiveServer(make_context(engine)) as server:
        yield server


def test_a_disconnect_aborts_the_beams_in_the_engine(slow_live: LiveServer) -> None:
    engine = slow_live.ctx.engine
    body = json.dumps({"messages": MESSAGES, "max_tokens": 8, "n": 3, "use_beam_search": True}).encode()
    with socket.create_connection(("127.0.0.1", slow_live.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # The first step (the prompt alone) has ended: the second's three beams are in the engine now.
        wait_until(lambda: engine.metrics().request_success_total.get("length") == 1)
    wait_until(lambda: engine.metrics().request_success_total == {"length": 3, "abort": 1}, timeout=2)
    time.sleep(0.3)  # and no later step is submitted
    assert engine.metrics().request_success_total == {"length": 3, "abort": 1}
    assert pool_is_free(engine)
