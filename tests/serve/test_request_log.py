"""--enable-log-requests: one line per request (id, token counts, latency), never the API key; off by default."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest

from tests.serve.conftest import LiveServer, make_context, new_engine

SECRET = "sk-very-secret-key"


def test_one_line_per_request_without_the_key(stories_tokenizer: Any, story_script: list[int],
                                              caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_context(new_engine(stories_tokenizer, story_script), api_key=[SECRET], enable_log_requests=True)
    auth = {"Authorization": f"Bearer {SECRET}", "X-Request-Id": "abc123"}
    with LiveServer(ctx) as live, caplog.at_level(logging.INFO):
        chat = httpx.post(live.url + "/v1/chat/completions", headers=auth, timeout=30,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        completion = httpx.post(live.url + "/v1/completions", headers=auth, timeout=30,
                                json={"prompt": "Lily", "max_tokens": 2, "stream": True})
    assert chat.json()["id"] == "chatcmpl-abc123" and completion.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxllm.serve.requests"]
    assert len(lines) == 2
    assert re.fullmatch(r"request chatcmpl-abc123: prompt_tokens=\d+ output_tokens=3 latency=[\d.]+s status=finished",
                        lines[0])
    assert re.fullmatch(r"request cmpl-abc123: prompt_tokens=\d+ output_tokens=2 latency=[\d.]+s status=finished",
                        lines[1])
    assert not any(SECRET in r.getMessage() for r in caplog.records)


def test_no_request_lines_by_default(live: LiveServer, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert http.post("/v1/completions", json={"prompt": "Lily", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.name == "jaxllm.serve.requests"]
