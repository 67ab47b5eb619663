"""The transport's limits: a request's head (line and headers) has a size, a header count and a deadline, its
body a deadline, a client that leaves mid-upload is a quiet line, and the requests still running when
--shutdown-timeout expires end as their clients can read them."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import API_KEY, LiveServer, make_context, new_engine, wait_until
from tests.serve.test_process import ServerProcess

BODY_TIMEOUT_S = HEADER_TIMEOUT_S = 1.0
MAX_HEAD_BYTES, MAX_HEADERS = 16 * 1024, 32
# vLLM's error JSON: exactly these keys.
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def impatient(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    """A server with small limits: BODY_TIMEOUT_S for a request body, HEADER_TIMEOUT_S, MAX_HEAD_BYTES and
    MAX_HEADERS for its head."""
    ctx = make_context(new_engine(stories_tokenizer, story_script), api_key=[API_KEY],
                       request_body_timeout=BODY_TIMEOUT_S, request_header_timeout=HEADER_TIMEOUT_S,
                       h11_max_incomplete_event_size=MAX_HEAD_BYTES, h11_max_header_count=MAX_HEADERS)
    with LiveServer(ctx) as server:
        yield server


def send_head(port: int, content_length: int) -> socket.socket:
    """A connection that has sent a chat completion's headers and no body yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode())
    return sock


def trickle(sock: socket.socket, piece: bytes, patience_s: float) -> bytes:
    """Send `piece` every 0.2 s until the server answers and closes the connection (or `patience_s` passes);
    what it answered (a reset connection may have lost the answer)."""
    sent = time.monotonic()
    sock.settimeout(0.2)
    reply = b""
    with sock:
        while time.monotonic() - sent < patience_s:
            try:
                sock.sendall(piece)
            except OSError:
                pass
            try:
                if not (data := sock.recv(65536)):
                    return reply  # closed by the server after its answer
                reply += data
            except TimeoutError:
                pass
            except ConnectionResetError:  # closed while a piece was still on its way in
                return reply
    raise AssertionError(f"the connection is still open after {patience_s} s; read {reply!r}")


def test_headers_trickling_in_get_408_at_their_deadline_and_the_connection_closes(impatient: LiveServer) -> None:
    sock = socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    reply = trickle(sock, b"X: y\r\n", patience_s=HEADER_TIMEOUT_S + 5)  # a header every 0.2 s, never the end
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower(), reply
    assert b"--request-header-timeout" in reply
    assert HEADER_TIMEOUT_S - 0.1 < elapsed < HEADER_TIMEOUT_S + 5, f"408 after {elapsed:.2f} s"


def test_a_silent_connection_is_closed_at_the_header_deadline(impatient: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=HEADER_TIMEOUT_S + 5) as sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 2 * MAX_HEAD_BYTES + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n",
], ids=["size", "count"])
def test_a_head_over_a_limit_gets_400_and_a_closed_connection(impatient: LiveServer, head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as sock:
        sock.sendall(head)
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 400") and b"connection: close" in reply, reply
        assert sock.recv(65536) == b""
    assert httpx.get(impatient.url + "/health").status_code == 200


def test_an_endless_header_is_refused_before_it_ends(impatient: LiveServer, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    """The parser buffers an incomplete header: its bytes count as they come."""
    caplog.set_level(logging.INFO, logger="jaxllm.serve")
    sock = socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
    reply = trickle(sock, b"a" * (MAX_HEAD_BYTES // 2), patience_s=HEADER_TIMEOUT_S + 5)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply
    assert f"headers over {MAX_HEAD_BYTES} bytes (--h11-max-incomplete-event-size)" in caplog.text


def test_a_body_trickling_in_gets_408_at_its_deadline_and_the_connection_closes(impatient: LiveServer) -> None:
    sock = send_head(impatient.port, content_length=10_000)
    sent = time.monotonic()
    reply = trickle(sock, b" ", patience_s=BODY_TIMEOUT_S + 5)  # the deadline is the whole body's, not a byte's
    elapsed = time.monotonic() - sent
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS and error["code"] == 408 and "--request-body-timeout" in error["message"]
    assert BODY_TIMEOUT_S - 0.1 < elapsed < BODY_TIMEOUT_S + 5, f"408 after {elapsed:.2f} s"


def test_a_client_leaving_mid_upload_is_one_debug_line(impatient: LiveServer, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.DEBUG, logger="jaxllm.serve")
    with send_head(impatient.port, content_length=10_000) as sock:
        sock.sendall(b'{"messages": [{"role": "user", "content": "')
    wait_until(lambda: "disconnected while sending the request body" in caplog.text, timeout=BODY_TIMEOUT_S + 5)
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []
    with httpx.Client(base_url=impatient.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        reply = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
    assert reply.status_code == 200


def read_stream(url: str, path: str, body: dict[str, Any], started: threading.Event, result: dict[str, Any]) -> None:
    """Stream one request; record its events (JSON, or the [DONE] string) or the transport error."""
    result.update(events=[], error=None)
    try:
        with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    data = line[len("data: "):]
                    result["events"].append(data if data == "[DONE]" else json.loads(data))
    except httpx.TransportError as e:
        result["error"] = e
    started.set()


def post_whole(url: str, path: str, body: dict[str, Any], result: dict[str, Any]) -> None:
    response = httpx.post(url + path, json=body, timeout=60)
    result.update(status=response.status_code, json=response.json())


def test_at_the_shutdown_deadline_streams_end_with_an_error_event_and_done_others_get_503() -> None:
    # NOTE: the engine on a thread starts sooner; the ending is the HTTP side's, wherever the engine runs.
    server = ServerProcess("tests.serve.fake_server", "--shutdown-timeout", "1", "--disable-frontend-multiprocessing",
                           env={"FAKE_STEP_S": "0.02"})
    chat = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400})
    completion = ("/v1/completions", {"prompt": "Once", "max_tokens": 400})
    streams = [({}, threading.Event(), request) for request in (chat, completion, chat)]
    wholes = [{} for _ in range(2)]
    try:
        server.wait_ready(60)
        threads = [threading.Thread(target=read_stream, args=(server.url, path, body, started, result))
                   for result, started, (path, body) in streams]
        threads += [threading.Thread(target=post_whole, args=(server.url, *completion, result)) for result in wholes]
        for thread in threads:
            thread.start()
        assert all(started.wait(20) for _, started, _ in streams)
        time.sleep(0.3)  # the whole-reply requests are generating too
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0, "".join(server.log)
        elapsed = time.monotonic() - sent
        for thread in threads:
            thread.join(10)
    finally:
        server.kill()
    log = "".join(server.log)
    assert elapsed < 1 + 5, f"exited {elapsed:.2f} s after SIGTERM"  # 8 s of steps each, cut at 1 s
    for result, _, _ in streams:
        assert result["error"] is None
        *chunks, error_event, done = result["events"]
        assert chunks and done == "[DONE]"
        assert set(error_event["error"]) == ERROR_KEYS and error_event["error"]["code"] == 503
        assert error_event["error"]["type"] == "ServiceUnavailableError"
    for result in wholes:
        assert result["status"] == 503 and set(result["json"]["error"]) == ERROR_KEYS, result
    assert "ending 5 unfinished request(s)" in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
