"""The server as a real process: SIGTERM drains in-flight requests then exits 0, engine death exits 1,
and `python -m jaxllm.serve` on the bundled model answers the openai SDK."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, module: str, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited early:\n" + "".join(self.log)
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready:\n" + "".join(self.log))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.reader.join(timeout=5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def started(module: str, *flags: str, timeout: float = 300) -> Iterator[ServerProcess]:
    """A server process ready to serve (its /health answers 200), killed on the way out."""
    server = ServerProcess(module, *flags)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.kill()


def stream_chat(url: str, max_tokens: int, started: threading.Event, result: dict[str, Any]) -> None:
    """Stream one chat; record the events read, whether [DONE] came, and any transport error."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    result.update(done=False, usage=None, error=None)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: ") and (chunk := json.loads(line[6:])).get("usage"):
                    result["usage"] = chunk["usage"]
    except httpx.TransportError as e:
        result["error"] = e
    started.set()


ENGINE_PLACES = pytest.mark.parametrize("engine_flags", [[], ["--disable-frontend-multiprocessing"]],
                                       ids=["engine-process", "engine-thread"])


@ENGINE_PLACES
def test_sigterm_drains_in_flight_requests_then_aborts_the_rest_and_exits_0(engine_flags: list[str]) -> None:
    server = ServerProcess("tests.serve.fake_server", "--shutdown-timeout", "2", *engine_flags,
                           env={"FAKE_STEP_S": "0.02"})
    try:
        server.wait_ready(60)
        short, long = {}, {}
        short_started, long_started = threading.Event(), threading.Event()
        threads = [threading.Thread(target=stream_chat, args=(server.url, 25, short_started, short)),
                   threading.Thread(target=stream_chat, args=(server.url, 400, long_started, long))]
        for thread in threads:
            thread.start()
        assert short_started.wait(20) and long_started.wait(20)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.get(server.url + "/health", timeout=2)
        assert server.wait_exit(30) == 0, "".join(server.log)
        assert time.monotonic() - sent < 10  # the long request (8 s of steps) was cut at the 2 s timeout
        for thread in threads:
            thread.join(10)
    finally:
        server.kill()
    assert short["done"] and short["usage"]["completion_tokens"] == 25  # finished within the timeout
    assert long["done"] and long["usage"] is None  # ended at the timeout: an error event, then [DONE]


@ENGINE_PLACES
def test_engine_death_fails_requests_with_500_and_exits_1(engine_flags: list[str]) -> None:
    server = ServerProcess("tests.serve.fake_server", *engine_flags,
                           env={"FAKE_FAIL_AT_STEP": "5", "FAKE_STEP_S": "0.01"})
    try:
        server.wait_ready(60)
        response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50})
        assert response.status_code == 500 and response.json()["error"]["code"] == 500
        assert server.wait_exit(30) == 1
    finally:
        server.kill()


@pytest.fixture(scope="module")
def real_server() -> Iterator[ServerProcess]:
    # NOTE: a small step budget keeps the compile at startup short on a CPU.
    with started("jaxllm.serve", "--served-model-name", "stories", "--api-key", "sk-real", "--enforce-eager",
                 "--disable-log-stats", "--max-model-len", "256", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "64") as server:
        yield server


@pytest.mark.slow
def test_python_m_jaxllm_serve_on_the_bundled_model(real_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key="sk-real", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["stories"]
    out = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert out.choices[0].text.strip() and out.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Once upon"}],
                                            max_tokens=12, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    full = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Once upon"}],
                                          max_tokens=12, temperature=0)
    assert streamed == full.choices[0].message.content
    assert any("--enforce-eager has no effect" in line for line in real_server.log)
    real_server.proc.send_signal(signal.SIGTERM)
    assert real_server.wait_exit(60) == 0
