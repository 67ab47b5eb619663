"""Admission: the work one request may ask for is bounded by flags (each 400 names its flag), an over-bound
body is refused before it is parsed, and every odd body is a 400; a bug is a 500 that carries only an id."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve import middleware
from serve.args import ServerArgs
from serve.errors import APIError, generation_error
from serve.request_bounds import RequestBounds, check_parsed, prescan
from tests.serve.conftest import LiveServer, make_context, new_engine, pool_is_free, wait_until
from tests.serve.test_errors import CHAT, MESSAGES, error_of

COMPLETIONS = "/v1/completions"
BATCH = "/v1/chat/completions/batch"
POST_PATHS = [COMPLETIONS, CHAT, BATCH, "/invocations", "/tokenize", "/detokenize"]
SMALL = RequestBounds(max_n_sequences=4, max_completion_prompts=3, max_prompt_tokens=10, max_stop_strings=2,
                      max_num_bad_words=2, max_json_values=40, vocab_size=8)


@pytest.fixture(scope="module")
def server(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    """The default bounds and body limit (32 MiB), no API key."""
    with LiveServer(make_context(new_engine(stories_tokenizer, story_script))) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _post_watching_rss(client: httpx.Client, path: str, body: bytes) -> tuple[httpx.Response, float, int]:
    """The response, its seconds, and the most this process (the server is a thread of it) grew meanwhile."""
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    # NOTE: sent in pieces, so this (client) side of the process never holds a second copy of the body.
    pieces = (body[start:start + 2**20] for start in range(0, len(body), 2**20))
    response = client.post(path, content=pieces, headers={"Content-Type": "application/json"})
    elapsed = time.monotonic() - start
    done.set()
    sampler.join()
    return response, elapsed, peak[0] - baseline


def test_a_prompt_list_fan_out_is_400_before_parsing(client: httpx.Client) -> None:
    body = b'{"prompt": [' + b"[1234], " * 2_499_999 + b'[1234]], "max_tokens": 1}'  # 20 MB
    response, elapsed, growth = _post_watching_rss(client, COMPLETIONS, body)
    error = error_of(response, 400)
    assert "--max-completion-prompts" in error["message"] and error["param"] == "prompt"
    # Parsing it alone took 1.6 s and 244 MB; the pre-scan answers in ~0.2 s, the process growing ~41 MB (the
    # body read in pieces, then joined).
    assert elapsed < 2.0, f"answered in {elapsed:.2f} s"
    assert growth < 100 * 2**20, f"grew {growth / 2**20:.0f} MB"


def test_n_of_a_million_is_400_at_once(client: httpx.Client) -> None:
    start = time.monotonic()
    error = error_of(client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1, "n": 1_000_000}), 400)
    assert time.monotonic() - start < 2.0
    assert error["param"] == "n"
    assert error["message"] == ("n must be at most 256, got 1000000. To increase this limit, set "
                                "--max-n-sequences.")


@pytest.mark.parametrize(("body", "param", "names"), [
    ({"prompt": ["a"] * 1025}, "prompt", "--max-completion-prompts"),
    ({"prompt": [7] * (2**20 + 1)}, "prompt", "--max-prompt-tokens-per-request"),
    ({"prompt": "a", "stop": ["x", "y", "z", "w", "v"]}, "stop", "--max-stop-strings"),
    ({"prompt": "a", "bad_words": ["x"] * 129}, "bad_words", "--max-num-bad-words"),
    ({"prompt": "a", "allowed_token_ids": [1] * 1_000_000}, "allowed_token_ids", "vocabulary size"),
    ({"prompt": "a", "logit_bias": {str(i): 1 for i in range(513)}}, "logit_bias", "vocabulary size"),
    ({"prompt": "a", "unknown_field": [0] * 140_000}, None, "--max-request-json-values"),
    ({"messages": [[{"role": "user", "content": "x"}]] * 1025}, "messages", "--max-completion-prompts"),
])
def test_each_default_bound_names_its_flag(client: httpx.Client, body: dict[str, Any], param: str | None,
                                           names: str) -> None:
    path = COMPLETIONS if "prompt" in body else BATCH
    error = error_of(client.post(path, json={**body, "max_tokens": 1}), 400)
    assert names in error["message"] and error["param"] == param


def test_a_request_at_every_default_bound_is_served(client: httpx.Client, server: LiveServer) -> None:
    body = {"prompt": ["a"] * 4, "max_tokens": 1, "n": 256, "stop": ["x"] * 4, "bad_words": ["y"] * 128,
            "allowed_token_ids": list(range(512))}
    response = client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 4 * 256
    wait_until(lambda: pool_is_free(server.ctx.engine))


def test_text_prompts_count_their_tokens_together(stories_tokenizer: Any, story_script: list[int]) -> None:
    ctx = make_context(new_engine(stories_tokenizer, story_script), max_prompt_tokens_per_request=12)
    with LiveServer(ctx) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        error = error_of(http.post(COMPLETIONS, json={"prompt": ["Once upon a time"] * 4, "max_tokens": 1}), 400)
        assert "more than 12 tokens" in error["message"] and "--max-prompt-tokens-per-request" in error["message"]
        assert http.post(COMPLETIONS, json={"prompt": ["Once upon"] * 2, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(("body", "over"), [
    ({"prompt": [[1, 2], [3]], "n": 4, "stop": ["a", "b"], "bad_words": ["c", "d"]}, None),
    ({"prompt": [[1], [2], [3], [4]]}, "maximum allowed count of 3"),
    ({"prompt": ["a, [b", "c", "d", "e"]}, "maximum allowed count of 3"),
    ({"prompt": list(range(11))}, "more than 10 tokens"),
    ({"prompt": [list(range(6)), list(range(5))]}, "more than 10 tokens"),
    ({"prompt": "a", "stop": ["x", "y", "z"]}, "`stop` holds more than 2"),
    ({"prompt": "a", "allowed_token_ids": [1] * 9}, "`allowed_token_ids` holds more than 8"),
    ({"prompt": "a", "logit_bias": {str(i): 1 for i in range(9)}}, "`logit_bias` holds more than 8"),
])
def test_the_pre_scan_and_the_parsed_check_agree(body: Any, over: str | None) -> None:
    padded = {**body, "pad": "," * 64}  # commas in a string: past the pre-scan's shortcut, so it walks the body
    scanned = _verdict(lambda: prescan(json.dumps(padded).encode(), SMALL))
    parsed = _verdict(lambda: check_parsed(padded, SMALL))
    assert scanned == parsed and (scanned is None if over is None else over in scanned), (scanned, parsed)


def test_the_pre_scan_counts_json_values_in_every_field() -> None:
    body = {"messages": [{"role": "user"}] * 18, "pad": ","}  # 1 + 1 + 18 * 2 + 1 values; 41 by the shortcut
    assert _verdict(lambda: prescan(json.dumps(body).encode(), SMALL)) is None
    body["messages"].append({"role": "user"})
    assert "more than 40 JSON values" in str(_verdict(lambda: prescan(json.dumps(body).encode(), SMALL)))


def _verdict(check: Any) -> str | None:
    try:
        check()
    except APIError as e:
        return e.message
    return None


def test_the_default_bounds_admit_what_clients_send() -> None:
    bounds = RequestBounds.of(ServerArgs(), vocab_size=262_144)
    rest = {"n": 256, "stop": ["\n"] * 4, "bad_words": ["x"] * 128, "allowed_token_ids": list(range(262_144))}
    prompt = b"[" + b"7, " * 999 + b"7]"  # 1024 prompts of 1000 tokens
    prescan(b'{"prompt": [' + b", ".join([prompt] * 1024) + b"], " + json.dumps(rest).encode()[1:], bounds)
    check_parsed({"prompt": [[7] * 1000] * 1024, **rest}, bounds)


def test_non_json_content_types_get_vllms_400(client: httpx.Client) -> None:
    for path in POST_PATHS:
        for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"}):
            error = error_of(client.post(path, content=b'{"prompt": "Hi"}', headers=headers), 400)
            assert error == {"message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is "
                             "allowed", "type": "Bad Request", "param": None, "code": 400}
    ok = client.post("/tokenize", content=b'{"prompt": "Hi"}',
                     headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", POST_PATHS)
def test_an_integer_past_4300_digits_is_400(client: httpx.Client, path: str) -> None:
    body = b'{"prompt": "Hi", "messages": [], "tokens": [1], "max_tokens": ' + b"9" * 5000 + b"}"
    error = error_of(client.post(path, content=body, headers={"Content-Type": "application/json"}), 400)
    assert "more than 4300 digits" in error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 1e39), ("temperature", 2.5), ("top_p", 1e39), ("min_p", 1e39), ("presence_penalty", 1e39),
    ("frequency_penalty", -1e39), ("repetition_penalty", 1e39), ("length_penalty", 1e39),
    ("logit_bias", {"1": 1e39}),
])
def test_numbers_outside_a_fields_range_are_400(client: httpx.Client, field: str, value: Any) -> None:
    error = error_of(client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1, field: value}), 400)
    assert error["param"] == field


def test_an_infinite_temperature_is_400(client: httpx.Client) -> None:
    body = b'{"prompt": "Hi", "max_tokens": 1, "temperature": Infinity}'
    error = error_of(client.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)
    assert error["message"] == "temperature must be a finite number, got inf." and error["param"] == "temperature"


@pytest.mark.parametrize("tag", [
    {"structures": [5], "triggers": ["<f"]},
    {"structures": [{"begin": "<f>", "schema": {}, "end": "</f>"}], "triggers": [5]},
    {"structures": [{"begin": 5, "end": "</f>"}], "triggers": ["<f"]},
])
@pytest.mark.parametrize("where", ["structured_outputs", "response_format"])
def test_a_malformed_structural_tag_is_400(client: httpx.Client, tag: dict[str, Any], where: str) -> None:
    spec = {"structural_tag": json.dumps(tag)} if where == "structured_outputs" else {"type": "structural_tag", **tag}
    error = error_of(client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, where: spec}), 400)
    assert error["param"] == where and "structural_tag" in error["message"]


def test_a_bug_is_a_500_with_only_an_id(client: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("secret internals at /home/x")

    monkeypatch.setattr(server.ctx.engine.info.tokenizer, "decode", broken)
    with caplog.at_level(logging.ERROR, logger="jaxllm.serve"):
        error = error_of(client.post("/detokenize", json={"tokens": [1]}), 500)
    assert "secret" not in error["message"]
    error_id = error["message"].split("error id ")[1].split(")")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_a_middleware_bug_is_a_500_with_only_an_id(client: httpx.Client, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: Any) -> None:
        raise RuntimeError("secret internals at /home/x")

    monkeypatch.setattr(middleware.BufferedBody, "__call__", broken)
    with caplog.at_level(logging.ERROR, logger="jaxllm.serve"):
        error = error_of(client.post("/tokenize", json={"prompt": "Hi"}), 500)
    assert "secret" not in error["message"]
    error_id = error["message"].split("error id ")[1].split(")")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_a_generation_bug_is_a_500_with_only_an_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="jaxllm.serve"):
        error = generation_error(KeyError("secret"), engine_dead=False)
    assert error.status == 500 and "secret" not in error.message and "error id" in error.message
    assert error.sse_event().startswith("data: {") and caplog.records[-1].exc_info
