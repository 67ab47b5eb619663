"""A real browser, as the Page Assist extension uses the API: a page from another origin lists the models
and streams a chat completion with an Authorization header (so CORS preflights are the browser's own).

Needs Debian's `chromium` and the `playwright` package (no browser download: executable_path).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.serve.conftest import API_KEY, MODEL_NAMES, LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>chat</title></head><body><pre id="out"></pre>
<script>
async function chat(base, key, content) {
  const headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"};
  const models = await (await fetch(base + "/v1/models", {headers})).json();
  const response = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers,
    body: JSON.stringify({model: models.data[0].id, messages: [{role: "user", content}], stream: true,
                          max_tokens: 12, temperature: 0}),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", chunks = 0, done = false, role = null;
  for (;;) {
    const {value, done: end} = await reader.read();
    if (end) break;
    buffer += decoder.decode(value, {stream: true});
    let at;
    while ((at = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      if (!event.startsWith("data: ")) continue;
      const payload = event.slice(6);
      if (payload === "[DONE]") { done = true; continue; }
      const delta = JSON.parse(payload).choices[0].delta;
      role = role ?? delta.role ?? null;
      text += delta.content ?? "";
      chunks += 1;
    }
  }
  document.getElementById("out").textContent = text;
  return {models: models.data.map(m => m.id), status: response.status, text, chunks, done, role};
}
</script></body></html>"""


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def page_origin() -> Iterator[str]:
    """The web app's origin: another loopback port than the API's."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install -y chromium)")
def test_a_page_from_another_origin_lists_models_and_streams_a_chat(live: LiveServer, page_origin: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(page_origin + "/index.html")
            result = page.evaluate("([base, key]) => chat(base, key, 'Once upon a time')", [live.url, API_KEY])
            shown = page.inner_text("#out")
        finally:
            browser.close()
    expected = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL_NAMES[0], "messages": [{"role": "user", "content": "Once upon a time"}],
                                "max_tokens": 12, "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert result["models"] == MODEL_NAMES and result["status"] == 200
    # NOTE: streamed in pieces, not one per token: a reader that lags gets several tokens in one delta, as vLLM's.
    assert result["done"] and result["role"] == "assistant" and result["chunks"] >= 2
    assert result["text"] == expected == shown
