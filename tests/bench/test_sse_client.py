"""bench/sse_client.py: the HTTP/1.1 response parser fed at arbitrary byte boundaries, and bench.serve
run over it against the real app (stand-in engine)."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest

from bench import serve as bench_serve
from bench.sse_client import HTTPProtocolError, ResponseParser
from jaxllm.tokenizer import load_tokenizer
from tests.serve.conftest import API_KEY, STORIES, STORY, LiveServer, make_context, new_engine

EVENTS = [{"i": i, "text": "é\u2028x" * (i % 3)} for i in range(12)]


def chunked_event_stream(line_end: bytes = b"\n") -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + line_end * 2 for e in EVENTS) + b"data: [DONE]" + line_end * 2
    rng = np.random.default_rng(0)
    out, pos = [], 0
    while pos < len(body):  # chunk borders that fall anywhere, inside events too
        size = int(rng.integers(1, 40))
        extension = b";ext=1" if pos == 0 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(body[pos:pos + size]), extension, body[pos:pos + size]))
        pos += size
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + b"".join(out) + b"0\r\n\r\n"


def feed_in_pieces(parser: ResponseParser, data: bytes, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos, now = 0, 0.0
    while pos < len(data):
        size = int(rng.integers(1, 64))
        now += 1.0
        parser.feed(data[pos:pos + size], now)
        pos += size


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_event_stream_split_anywhere(line_end, seed):
    parser = ResponseParser()
    feed_in_pieces(parser, chunked_event_stream(line_end), seed)
    assert parser.done
    response = parser.response
    assert response.status == 200 and response.headers["transfer-encoding"] == "chunked"
    payloads = [data for _, data in response.events]
    assert [json.loads(p) for p in payloads[:-1]] == EVENTS and payloads[-1] == b"[DONE]"
    times = [t for t, _ in response.events]
    assert times == sorted(times) and len(set(times)) > 1  # each stamped by the read that completed it


def test_content_length_body_and_read_until_close():
    error = json.dumps({"error": {"message": "bad", "code": 400}}).encode()
    parser = ResponseParser()
    feed_in_pieces(parser, b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(error), error), seed=3)
    assert parser.done and parser.response.status == 400 and parser.response.body == error

    parser = ResponseParser()  # no length, no chunking: the body ends when the server closes
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2", 1.0)
    assert not parser.done and [d for _, d in parser.response.events] == [b"1"]
    parser.connection_closed(2.0)
    assert parser.done and parser.response.events == [(1.0, b"1"), (2.0, b"2")]


def test_a_cut_response_is_an_error():
    parser = ResponseParser()
    parser.feed(chunked_event_stream()[:300], 1.0)
    with pytest.raises(HTTPProtocolError):
        parser.connection_closed(2.0)
    with pytest.raises(HTTPProtocolError):
        ResponseParser().feed(b"SSH-2.0-OpenSSH\r\n\r\n", 1.0)


def test_bench_serve_against_the_app():
    tokenizer = load_tokenizer(STORIES)
    engine = new_engine(tokenizer, tokenizer.encode(" " + STORY, add_special_tokens=False))
    with LiveServer(make_context(engine, api_key=[API_KEY])) as server:
        args = argparse.Namespace(dataset="fixed", num_prompts=6, input_len=16, output_len=9, vocab_size=512,
                                  base_url=server.url, model=None, api_key=API_KEY, request_rate=float("inf"),
                                  max_concurrency=2)
        result = asyncio.run(bench_serve.run(args))
        assert (result["completed"], result["failed"], result["requests_with_unexpected_length"]) == (6, 0, 0)
        assert result["total_output_tokens"] == 6 * 9 and result["total_output_chunks"] <= 6 * 9
        assert result["model"] == "stories" and result["median_ttft_ms"] > 0

        args.api_key, args.model = "wrong", "stories"
        with pytest.raises(SystemExit, match="HTTP 401"):
            asyncio.run(bench_serve.run(args))
