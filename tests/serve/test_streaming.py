"""SSE over raw HTTP, client disconnects (streaming or not) and many concurrent streams, multibyte text."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from typing import Any

import httpx
import pytest

from jaxllm.engine.engine_process import ProcessEngine
from jaxllm.tokenizer import load_tokenizer
from tests.fixtures import fixture_tokenizer
from tests.serve.conftest import (
    API_KEY,
    LiveServer,
    make_context,
    new_engine,
    pool_is_free,
    sse_events,
    story_engine_parts,
    wait_until,
)

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_chat_sse_wire_format(live: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True, "n": 2}
    with httpx.Client(base_url=live.url, headers=AUTH) as http, http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {c["choices"][0]["index"] for c in chunks[:2]} == {0, 1}
    assert all("usage" not in c for c in chunks)  # no usage chunk unless stream_options.include_usage
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1] and all(f["finish_reason"] == "length" for f in finishes)


def test_completion_sse_wire_format(live: LiveServer) -> None:
    body = {"prompt": "Lily", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=live.url, headers=AUTH) as http, http.stream("POST", "/v1/completions",
                                                                           json=body) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events[:-1])


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def slow_live(request: Any, stories_tokenizer: Any, story_script: list[int]) -> Any:
    """A server whose engine takes 5 ms per step, so a request can be cut off midway; its engine loop on
    a thread (AsyncEngine) or in a child process (ProcessEngine, as `python -m jaxllm.serve` runs it)."""
    if request.param == "engine-thread":
        engine = new_engine(stories_tokenizer, story_script, delay_s=0.005, num_pages=1024)
    else:
        engine = ProcessEngine(functools.partial(story_engine_parts, delay_s=0.005, num_pages=1024))
    with LiveServer(make_context(engine)) as server:
        yield server


def test_64_concurrent_streams_with_a_quarter_disconnecting(slow_live: LiveServer) -> None:
    engine = slow_live.ctx.engine
    wait_until(lambda: pool_is_free(engine))
    aborts_before = engine.metrics().request_success_total.get("abort", 0)
    max_tokens = 40

    async def one(client: httpx.AsyncClient, i: int) -> tuple[bool, str | None, int]:
        """(got [DONE], finish_reason, completion_tokens from the usage chunk)."""
        # NOTE: the requests that disconnect ask for many tokens, so on a loaded machine none can
        # finish before the server sees its client go (it would count as finished, not aborted).
        leaves = i % 4 == 0
        body = {"messages": [{"role": "user", "content": f"Story number {i}"}],
                "max_tokens": 300 if leaves else max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            finish, completion_tokens, seen = None, 0, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen += 1
                if leaves and seen == 4:
                    return False, None, 0  # disconnect midway: close the stream unread
                if line == "data: [DONE]":
                    return True, finish, completion_tokens
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    finish = chunk["choices"][0]["finish_reason"] or finish
                else:
                    completion_tokens = chunk["usage"]["completion_tokens"]
        raise AssertionError("stream ended without [DONE]")

    async def main() -> list[tuple[bool, str | None, int]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=slow_live.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    stayed = [r for i, r in enumerate(results) if i % 4]
    assert len(stayed) == 48 and all(r == (True, "length", max_tokens) for r in stayed)
    wait_until(lambda: pool_is_free(engine), timeout=10)
    assert engine.metrics().request_success_total.get("abort", 0) == aborts_before + 16


def test_non_streaming_disconnect_aborts_the_request(slow_live: LiveServer) -> None:
    engine = slow_live.ctx.engine
    wait_until(lambda: pool_is_free(engine))
    before = engine.metrics().request_success_total.get("abort", 0)
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}).encode()
    with socket.create_connection(("127.0.0.1", slow_live.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: engine.metrics().num_requests_running == 1)
    start = time.monotonic()
    # 400 tokens at 5 ms a step would take 2 s more; the abort frees the pages at once.
    wait_until(lambda: pool_is_free(engine), timeout=1.5)
    assert time.monotonic() - start < 1.5
    wait_until(lambda: engine.metrics().request_success_total.get("abort", 0) == before + 1)


MULTIBYTE = "你好，世界！🌍🙂 Ünïcödé ✨ 日本語のテキスト 👩‍👩‍👧 "


def test_streamed_multibyte_text_equals_the_non_streamed_text() -> None:
    tokenizer = load_tokenizer(fixture_tokenizer("qwen2.5"))
    script = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # The test only means something if some tokens are partial UTF-8 characters on their own.
    assert any("\ufffd" in tokenizer.decode([t]) for t in script)
    engine = new_engine(tokenizer, script, eos_token_ids=(tokenizer.eos_token_id,))
    with LiveServer(make_context(engine)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        for path, body, text_of in [
            (CHAT, {"messages": [{"role": "user", "content": "说"}]},
             lambda choice: choice.get("message", choice.get("delta", {})).get("content") or ""),
            ("/v1/completions", {"prompt": "说"}, lambda choice: choice["text"]),
        ]:
            body = {**body, "max_tokens": 3 * len(script), "temperature": 0}
            full = text_of(http.post(path, json=body).json()["choices"][0])
            with http.stream("POST", path, json={**body, "stream": True}) as response:
                chunks = [e for e in sse_events(response.iter_lines()) if e != "[DONE]"]
            pieces = [text_of(c["choices"][0]) for c in chunks]
            assert "".join(pieces) == full
            assert "\ufffd" not in full and "🌍🙂" in full and "👩\u200d👩\u200d👧" in full
            assert all("\ufffd" not in p for p in pieces)


def test_sse_lines_survive_unicode_line_breaks():
    """U+0085/U+2028/U+2029 in generated text are escaped, so splitlines-based SSE readers (httpx's
    aiter_lines) see one line per event and the JSON still decodes to the same text."""
    import json

    from serve.streaming import sse

    text = "a\u2028b\x85c\u2029d é 日本"
    event = sse({"text": text})
    assert len(event.strip().splitlines()) == 1
    assert json.loads(event.strip().removeprefix("data: "))["text"] == text
