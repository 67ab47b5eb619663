"""CORS over raw HTTP: browser preflights are answered before auth with the configured policy."""

from __future__ import annotations

from typing import Any

import httpx

from tests.serve.conftest import API_KEY, LiveServer, make_context, new_engine

PREFLIGHT = {
    "Origin": "http://127.0.0.1:9",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_preflight_is_answered_before_auth(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url) as http:
        response = http.options("/v1/chat/completions", headers=PREFLIGHT)  # no API key
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert "POST" in response.headers["access-control-allow-methods"]
        # The real request then carries the key, and even its 401 is readable by the page.
        ok = http.get("/v1/models", headers={"Origin": PREFLIGHT["Origin"], "Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
        denied = http.get("/v1/models", headers={"Origin": PREFLIGHT["Origin"]})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"


def test_configured_origins_methods_and_headers(stories_tokenizer: Any, story_script: list[int]) -> None:
    engine = new_engine(stories_tokenizer, story_script)
    ctx = make_context(engine, allowed_origins=["http://good.example"], allowed_methods=["GET", "POST"],
                       allowed_headers=["Authorization", "Content-Type"])
    with LiveServer(ctx) as live, httpx.Client(base_url=live.url) as http:
        good = http.options("/v1/models", headers={**PREFLIGHT, "Origin": "http://good.example"})
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "http://good.example"
        allowed = {h.strip().lower() for h in good.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert http.options("/v1/models", headers={**PREFLIGHT, "Origin": "http://evil.example"}).status_code == 400
        put = http.options("/v1/models", headers={**PREFLIGHT, "Origin": "http://good.example",
                                                   "Access-Control-Request-Method": "PUT"})
        assert put.status_code == 400
        simple = http.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
