"""How loaded the server is, for load balancers: the in-flight generation count behind /load
(--enable-server-load-tracking) and ORCA's `endpoint-load-metrics` response header, both as vLLM 0.34 serves them."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from jaxllm.engine.metrics import EngineMetrics
from serve.middleware import route_path

# The request header that asks for the ORCA report, and the one the report comes in.
LOAD_REPORT_FORMAT_HEADER = "endpoint-load-metrics-format"
LOAD_REPORT_HEADER = "endpoint-load-metrics"

# The routes vLLM counts (its load_aware_call handlers; /invocations runs them).
TRACKED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/chat/completions/batch", "/invocations"})


class ServerLoad:
    """The number of generation requests in flight: from the request's arrival until its response has been
    sent or its client has gone, however it ends."""

    def __init__(self) -> None:
        self.in_flight = 0

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """`app` with its TRACKED_PATHS requests counted."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or route_path(scope) not in TRACKED_PATHS:
                await app(scope, receive, send)
                return
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return counted


def load_report_header(report_format: str, metrics: EngineMetrics) -> dict[str, str]:
    """The `endpoint-load-metrics` header in the format asked for (TEXT or JSON, any case); none for another.

    vLLM's named metrics: its Prometheus gauges vllm:num_requests_waiting and vllm:kv_cache_usage_perc (a
    fraction, 0..1), in that order."""
    named = {"num_requests_waiting": float(metrics.num_requests_waiting),
             "kv_cache_usage_perc": float(metrics.kv_cache_usage)}
    match report_format.lower():
        case "text":
            return {LOAD_REPORT_HEADER: "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named.items())}
        case "json":
            return {LOAD_REPORT_HEADER: "JSON " + json.dumps({"named_metrics": named})}
        case _:
            return {}
