"""The live status page: GET /dashboard (a static page) and GET /dashboard/data (what it shows, as JSON).

The page (`serve/static/dashboard.html`: plain HTML and JS, no external assets) polls /dashboard/data once a
second. The data shows the flags and the requests, so the API key guards it (`serve.middleware.BearerAuth`);
the page itself is open and asks for the key. Everything comes from the engine's metrics snapshot
(`EngineClient.metrics()`, whose `live` field lists the oldest unfinished requests and the compiled buckets) and
`ThroughputHistory`, which samples its token counters while the server runs. `--disable-dashboard` removes
both routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from jaxllm.config import EngineConfig, option_fields
from jaxllm.engine.live_status import LiveRequest
from jaxllm.engine.metrics import EngineMetrics
from serve.args import ServerArgs

if TYPE_CHECKING:
    from serve.app import ServingContext

PAGE_PATH = Path(__file__).parent / "static" / "dashboard.html"
SAMPLE_INTERVAL_S = 1.0
HISTORY_SPAN_S = 300.0  # the plots' width: the last five minutes
SECRET_OPTIONS = frozenset({"api_key"})  # shown as set, never their values
# NOTE: the browser itself then refuses any asset from elsewhere: the page is one self-contained file.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src data:")

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Sample:
    """The engine over one sampling interval (rates) and at its end (gauges)."""

    wall_time: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    kv_cache_usage: float  # 0..1
    running: int
    waiting: int


class ThroughputHistory:
    """Token rates and load, one `Sample` per interval over the last `span_s` seconds."""

    def __init__(self, read_metrics: Callable[[], EngineMetrics], *, interval_s: float = SAMPLE_INTERVAL_S,
                 span_s: float = HISTORY_SPAN_S) -> None:
        self.interval_s, self.span_s = interval_s, span_s
        self._read_metrics = read_metrics
        self._samples: deque[Sample] = deque(maxlen=round(span_s / interval_s))
        self._last: tuple[float, int, int] | None = None  # (time.monotonic(), prompt tokens, output tokens)

    @property
    def samples(self) -> list[Sample]:
        return list(self._samples)

    def record(self) -> None:
        """Read the counters; from the second reading on, append the rates since the previous one."""
        metrics, now = self._read_metrics(), time.monotonic()
        prompt, output = metrics.prompt_tokens_total, metrics.generation_tokens_total
        if self._last is not None:
            then, last_prompt, last_output = self._last
            elapsed = max(now - then, 1e-6)
            self._samples.append(Sample(time.time(), (prompt - last_prompt) / elapsed, (output - last_output) / elapsed,
                                        metrics.kv_cache_usage, metrics.num_requests_running,
                                        metrics.num_requests_waiting))
        self._last = (now, prompt, output)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        """Record every `interval_s` on the event loop while the context is open."""

        async def sample_forever() -> None:
            while True:
                self.record()
                await asyncio.sleep(self.interval_s)

        task = asyncio.create_task(sample_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Dashboard:
    """The two routes over one server's context, and the history their plots draw."""

    def __init__(self, ctx: ServingContext, version: str) -> None:
        self.ctx = ctx
        self.version = version
        self.history = ThroughputHistory(ctx.engine.metrics)
        self.page = PAGE_PATH.read_text(encoding="utf-8")
        self.flags = flags_set(ctx.engine.info.config, ctx.args)  # both frozen: computed once

    def endpoints(self) -> list[tuple[str, Endpoint, list[str]]]:
        async def page(request: Request) -> Response:
            return HTMLResponse(self.page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                    "Cache-Control": "no-store"})

        async def data(request: Request) -> Response:
            return JSONResponse(self.status(), headers={"Cache-Control": "no-store"})

        return [("/dashboard", page, ["GET"]), ("/dashboard/data", data, ["GET"])]

    def status(self) -> dict[str, Any]:
        """What the page shows: the model, its throughput and load, the queues, the compile state, the flags."""
        ctx = self.ctx
        engine, metrics = ctx.engine, ctx.engine.metrics()
        info, live = engine.info, metrics.live
        queries, hits = metrics.prefix_cache_queries_total, metrics.prefix_cache_hits_total
        return {
            "now": time.time(),
            "started_at": ctx.started_at,
            "engine_alive": not engine.is_dead,
            "version": self.version,
            "model": {"name": ctx.model_name, "served_model_names": info.served_model_names,
                      "model": info.config.model.model, "max_model_len": info.max_model_len},
            "history": {"interval_s": self.history.interval_s, "span_s": self.history.span_s,
                        "samples": [dataclasses.asdict(sample) for sample in self.history.samples]},
            "totals": {"prompt_tokens": metrics.prompt_tokens_total, "output_tokens": metrics.generation_tokens_total,
                       "preemptions": metrics.num_preemptions_total,
                       "finished": dict(metrics.request_success_total)},
            "kv_cache": {"usage": metrics.kv_cache_usage, "num_pages": info.limits.num_pages,
                         "num_free_pages": metrics.num_free_pages, "block_size": info.limits.block_size},
            "prefix_cache": {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None},
            "requests": {"running": metrics.num_requests_running, "waiting": metrics.num_requests_waiting,
                         "unfinished": live.num_requests, "listed": [_request_json(r) for r in live.requests]},
            "compile": {"forward_buckets": [{"tokens": t, "pages": p, "loaded": loaded}
                                            for t, p, loaded in live.compile.forward_buckets],
                        "samplers_loaded": live.compile.samplers_loaded},
            "limits": dataclasses.asdict(info.limits),
            "flags": self.flags,
        }


def _request_json(request: LiveRequest) -> dict[str, Any]:
    return {"id": request.request_id, "state": request.state, "arrival_time": request.arrival_wall_time,
            "n": request.n, "unfinished": request.num_unfinished, "prompt_tokens": request.prompt_tokens,
            "prefilled_tokens": request.prefilled_tokens, "output_tokens": request.output_tokens}


def flags_set(config: EngineConfig, args: ServerArgs) -> dict[str, Any]:
    """The options that differ from their defaults, by flag (`--max-num-seqs`), secrets as "(set)"."""
    values: list[tuple[dataclasses.Field, Any]] = [
        (f, getattr(getattr(config, group) if group else config, f.name)) for group, f in option_fields()]
    values.append((next(f for f in dataclasses.fields(config) if f.name == "structured_outputs_config"),
                   dataclasses.asdict(config.structured_outputs_config)))
    values += [(f, getattr(args, f.name)) for f in dataclasses.fields(args)]
    out = {}
    for f, value in values:
        if value != _default(f):
            out["--" + f.name.replace("_", "-")] = "(set)" if f.name in SECRET_OPTIONS else value
    return out


def _default(f: dataclasses.Field) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
