"""Shared fixtures: the real app over a real HTTP socket (uvicorn in a thread), in front of a real
`AsyncEngine` whose device is the hand-computable `FakeModelRunner`."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from jaxllm.tokenizer import load_tokenizer
from serve.app import ServingContext, build_app
from serve.args import ServerArgs
from serve.http_protocol import http_protocol
from tests.serve.fake_engine import MODEL_NAMES, STORIES, STORY, new_engine, pool_is_free, story_engine_parts

__all__ = ["MODEL_NAMES", "STORIES", "STORY", "new_engine", "pool_is_free", "story_engine_parts"]

API_KEY = "sk-test-1234"


class LiveServer:
    """The app served by uvicorn on a loopback port, in a background thread."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(ctx), log_level="warning", access_log=False, log_config=None,
                                timeout_graceful_shutdown=1, http=http_protocol(ctx.args))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_context(engine: Any, **server_args: Any) -> ServingContext:
    args = dataclasses.replace(ServerArgs(), **server_args)
    return ServingContext(engine=engine, args=args)


@pytest.fixture(scope="session")
def stories_tokenizer() -> Any:
    return load_tokenizer(STORIES)


@pytest.fixture(scope="session")
def story_script(stories_tokenizer: Any) -> list[int]:
    return stories_tokenizer.encode(" " + STORY, add_special_tokens=False)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def live(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    """The main server: stand-in engine over stories260K's tokenizer, an API key, two model names."""
    engine = new_engine(stories_tokenizer, story_script)
    ctx = make_context(engine, api_key=[API_KEY], max_request_body_bytes=64 * 1024)
    with LiveServer(ctx) as server:
        yield server


@pytest.fixture()
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of an SSE stream, JSON-decoded except the final "[DONE]"."""
    import json

    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
