"""The live status page: /dashboard (open) and its data, /dashboard/data (behind the API key), and the page
itself in headless Chromium against a server under load (skipped without Debian's chromium and playwright)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from jaxllm.config import EngineConfig, ModelConfig, SchedulerConfig, StructuredOutputsConfig
from jaxllm.engine.engine_process import wake_while_loading
from jaxllm.engine.live_status import CompileState
from serve.app import build_app
from serve.args import ServerArgs
from serve.dashboard import ThroughputHistory, flags_set
from tests.serve.conftest import (
    API_KEY,
    MODEL_NAMES,
    STORY,
    LiveServer,
    make_context,
    new_engine,
    pool_is_free,
    wait_until,
)
from tests.serve.test_browser import CHROMIUM, CHROMIUM_FLAGS

AUTH = {"Authorization": f"Bearer {API_KEY}"}
STEP_S = 0.01  # the stand-in device's step time: a 300-token request runs for about 3 s
NUM_PAGES = 4096  # n=130 sequences of 340 tokens fit without preemption


@pytest.fixture(scope="module")
def server(stories_tokenizer: Any, story_script: list[int]) -> Iterator[LiveServer]:
    with LiveServer(make_context(new_engine(stories_tokenizer, story_script, delay_s=STEP_S, num_pages=NUM_PAGES),
                                 api_key=[API_KEY])) as live:
        yield live


def test_the_page_is_open_and_its_data_needs_the_key(server: LiveServer) -> None:
    page = httpx.get(server.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script src" not in page.text and "<link" not in page.text  # one self-contained file
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.get(server.url + "/dashboard/data", headers=headers)
        assert denied.status_code == 401
        assert denied.json() == httpx.get(server.url + "/v1/models", headers=headers).json()  # the API's 401
    assert httpx.get(server.url + "/dashboard/data", headers=AUTH).status_code == 200


def test_the_data_lists_running_and_waiting_requests_with_their_ages_and_tokens(server: LiveServer) -> None:
    """n=130 fills the 128 seats (2 of its sequences wait), so a request after it waits whole."""
    prompt = list(range(10, 50))
    fan_out = {"model": MODEL_NAMES[0], "prompt": prompt, "n": 130, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, json=fan_out, timeout=30) as stream:
        lines = stream.iter_lines()  # NOTE: held open: a closed iterator would close the stream (an abort)
        chunks = 0
        while chunks < 5:
            chunks += next(lines).startswith("data: ")
        later = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",), kwargs={
            "headers": AUTH, "json": {"model": MODEL_NAMES[0], "prompt": [7, 8, 9], "max_tokens": 2}, "timeout": 30})
        later.start()
        status: dict[str, Any] = {}

        def both_listed() -> bool:
            status.update(httpx.get(server.url + "/dashboard/data", headers=AUTH).json())
            return len(status["requests"]["listed"]) == 2 and status["requests"]["waiting"] == 3  # gauges: a step on

        wait_until(both_listed)
    later.join(30)
    first, second = status["requests"]["listed"]
    assert (status["requests"]["running"], status["requests"]["waiting"], status["requests"]["unfinished"]) == (
        128, 3, 2)
    assert {key: first[key] for key in ("state", "n", "unfinished", "prompt_tokens", "prefilled_tokens")} == {
        "state": "running", "n": 130, "unfinished": 130, "prompt_tokens": len(prompt), "prefilled_tokens": len(prompt)}
    assert 5 <= first["output_tokens"] < 128 * 300
    assert {key: second[key] for key in ("state", "n", "unfinished", "prompt_tokens", "prefilled_tokens",
                                         "output_tokens")} == {
        "state": "waiting", "n": 1, "unfinished": 1, "prompt_tokens": 3, "prefilled_tokens": 0, "output_tokens": 0}
    assert 0 <= status["now"] - second["arrival_time"] <= status["now"] - first["arrival_time"] < 30


def test_the_data_shows_the_model_the_flags_and_the_pool_and_no_request_once_idle(server: LiveServer) -> None:
    wait_until(lambda: pool_is_free(server.ctx.engine))
    response = httpx.get(server.url + "/dashboard/data", headers=AUTH)
    status = response.json()
    assert status["requests"] == {"running": 0, "waiting": 0, "unfinished": 0, "listed": []}
    assert API_KEY not in response.text
    assert status["model"]["name"] == MODEL_NAMES[0] and status["model"]["served_model_names"] == MODEL_NAMES
    assert status["flags"]["--api-key"] == "(set)" and status["flags"]["--served-model-name"] == MODEL_NAMES
    assert status["kv_cache"]["num_pages"] == status["limits"]["num_pages"] == NUM_PAGES
    assert status["compile"] == {"forward_buckets": [], "samplers_loaded": 0}  # the stand-in runner compiles nothing
    assert status["engine_alive"] is True


def test_disable_dashboard_removes_both_routes(server: LiveServer) -> None:
    args = dataclasses.replace(server.ctx.args, disable_dashboard=True)
    client = TestClient(build_app(dataclasses.replace(server.ctx, args=args)))  # no lifespan: the engine runs already
    not_found = client.get("/no-such-route", headers=AUTH)
    for path in ("/dashboard", "/dashboard/data"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404 and response.json() == not_found.json()


def test_flags_set_lists_what_differs_from_the_defaults_and_hides_keys() -> None:
    assert flags_set(EngineConfig(), ServerArgs()) == {}
    structured = StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)
    config = EngineConfig(model=ModelConfig(max_logprobs=5), scheduler=SchedulerConfig(max_num_seqs=64),
                          structured_outputs_config=structured)
    assert flags_set(config, ServerArgs(api_key=["sk-secret"], port=9000)) == {
        "--max-logprobs": 5, "--max-num-seqs": 64, "--port": 9000, "--api-key": "(set)",
        "--structured-outputs-config": dataclasses.asdict(structured),
    }


def test_throughput_history_keeps_rates_over_its_span() -> None:
    counters = SimpleNamespace(prompt_tokens_total=0, generation_tokens_total=0, kv_cache_usage=0.25,
                               num_requests_running=3, num_requests_waiting=1)
    history = ThroughputHistory(lambda: counters, interval_s=1.0, span_s=3.0)
    history.record()
    assert history.samples == []  # a rate needs two readings
    for _ in range(5):
        started = time.monotonic()
        time.sleep(0.05)
        counters.prompt_tokens_total += 40
        counters.generation_tokens_total += 10
        history.record()
        elapsed = time.monotonic() - started
        sample = history.samples[-1]
        assert 10 / (elapsed + 0.05) <= sample.output_tokens_per_s <= 10 / 0.05
        assert sample.prompt_tokens_per_s == pytest.approx(4 * sample.output_tokens_per_s)
    assert len(history.samples) == 3  # span / interval
    assert (sample.kv_cache_usage, sample.running, sample.waiting) == (0.25, 3, 1)


def test_an_idle_engine_process_reports_while_its_buckets_load() -> None:
    """Its loop, blocked while idle, is woken (and so reports its compile state) until the last bucket loads."""
    loaded, wakes = threading.Event(), []
    runner = SimpleNamespace(compile_state=lambda: CompileState(((16, 8, True), (32, 8, loaded.is_set())), 1))
    commands = SimpleNamespace(wake=lambda: wakes.append(loaded.is_set()))
    waker = threading.Thread(target=wake_while_loading, args=(runner, commands, 0.01), daemon=True)
    waker.start()
    wait_until(lambda: len(wakes) >= 3)
    assert waker.is_alive() and not any(wakes)
    loaded.set()
    waker.join(5)
    assert not waker.is_alive() and wakes[-1] is True


@contextlib.contextmanager
def _load(url: str, clients: int = 4) -> Iterator[None]:
    """`clients` loops of completions until the block ends; they share STORY's first page (prefix-cache hits)."""
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            while not stop.is_set():
                http.post("/v1/completions", json={"model": MODEL_NAMES[0], "prompt": f"{STORY} {index}",
                                                   "max_tokens": 48 + 16 * index})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install -y chromium)")
def test_the_page_in_a_browser_asks_for_the_key_then_follows_the_load(server: LiveServer, tmp_path: Any) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    errors: list[str] = []
    with _load(server.url), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            # NOTE: the 401 before the key is entered is logged as a failed resource load: not a page error.
            # The waits poll from here: page.wait_for_function evaluates strings, which the page's CSP forbids.
            page.on("console", lambda message: message.type == "error"
                    and "Failed to load resource" not in message.text and errors.append(message.text))
            page.goto(server.url + "/dashboard")
            wait_until(lambda: "API key" in page.inner_text("#message"))
            page.fill("#api-key", API_KEY)
            page.click("#key-form button")
            wait_until(lambda: page.evaluate("parseFloat(document.getElementById('output-tps').textContent) > 0"
                                             " && document.querySelectorAll('#requests td.id').length > 0"))
            total = page.inner_text("#output-total")
            wait_until(lambda: page.inner_text("#output-total") != total)
            shown = {name: page.inner_text(f"#{name}")
                     for name in ("message", "model-name", "running", "prefix-hit-rate")}
            states = set(page.locator("#requests td.state").all_inner_texts())
            flags = page.inner_text("#flags-table")
            points = int(page.get_attribute("#throughput-plot", "data-points") or 0)
            screenshot = tmp_path / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot}")
        finally:
            browser.close()
    assert errors == []
    assert shown["message"] == "" and shown["model-name"] == MODEL_NAMES[0]
    assert 1 <= int(shown["running"]) <= 4 and shown["prefix-hit-rate"].endswith("%")
    assert states <= {"running", "waiting"} and points >= 1
    assert "--api-key\t(set)" in flags and API_KEY not in flags
