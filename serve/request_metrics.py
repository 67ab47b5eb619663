"""The per-request `metrics` object of --enable-per-request-metrics (vLLM 0.34.0's PerRequestMetrics).

Built from the timings the engine puts on a finished request's output (`RequestOutput.metrics`, seconds):
`time_to_first_token` and `queue_time` from its arrival, `decode_time` from its first token to its last.
vLLM times the first token from the request's first schedule, so the queue time is taken off here.
"""

from __future__ import annotations

from typing import Any


def reply_metrics(enabled: bool, num_sequences: int, timings: dict[str, float],
                  num_generated_tokens: int) -> dict[str, Any] | None:
    """A reply's `metrics`: with --enable-per-request-metrics (`enabled`), for a single sequence (one prompt,
    n=1), as vLLM gives it; else None."""
    if not enabled or num_sequences != 1:
        return None
    return per_request_metrics(timings, num_generated_tokens)


def per_request_metrics(timings: dict[str, float], num_generated_tokens: int) -> dict[str, Any]:
    """Each field None where a timing it needs is missing (a request aborted before its first token)."""
    queue = timings.get("queue_time")
    first_token = timings.get("time_to_first_token")
    decode = timings.get("decode_time")
    scheduled_to_first = first_token - queue if first_token is not None and queue is not None else None
    tokens_per_second = None
    if scheduled_to_first is not None and decode is not None and scheduled_to_first + decode > 0:
        tokens_per_second = num_generated_tokens / (scheduled_to_first + decode)
    return {
        "time_to_first_token_ms": _ms(scheduled_to_first),
        "generation_time_ms": _ms(decode),
        "queue_time_ms": _ms(queue),
        "mean_itl_ms": _ms(decode / (num_generated_tokens - 1)) if decode is not None and num_generated_tokens > 1
        else None,
        "tokens_per_second": tokens_per_second,
        "speculative_decoding": None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
