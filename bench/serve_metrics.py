"""The serving metrics of bench.serve, from per-request timestamps (no I/O here): vLLM `bench serve`'s
definitions. TTFT: request sent to first content chunk. ITL: gaps between content chunks, all
requests pooled. TPOT per request: (latency - ttft) / (output_tokens - 1). Throughputs count the
successful requests over the whole benchmark duration."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.common import summary_ms


@dataclass
class RequestResult:
    input_tokens: int
    output_tokens: int = 0  # the server's usage.completion_tokens where reported, else the chunks
    start: float = 0.0  # perf_counter seconds
    chunks: list[float] = field(default_factory=list)  # arrival time of each content chunk
    end: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [gap for r in ok for gap in np.diff(r.chunks)]
    errors = sorted({r.error or "no content chunk" for r in results if not r.ok})
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors[:5],
        "duration_s": round(duration_s, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "total_output_chunks": sum(len(r.chunks) for r in ok),  # ITL is per chunk: chunks < tokens widens it
        "request_throughput": round(len(ok) / duration_s, 3),
        "output_tokens_per_s": round(out_tokens / duration_s, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / duration_s, 1),
        **summary_ms([r.ttft for r in ok], "ttft"), **summary_ms(tpot, "tpot"), **summary_ms(itl, "itl"),
    }


_ROWS = [
    ("Request rate (req/s)", "request_rate"), ("Max concurrency", "max_concurrency"),
    ("Successful requests", "completed"), ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration_s"), ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"), ("Request throughput (req/s)", "request_throughput"),
    ("Output token throughput (tok/s)", "output_tokens_per_s"),
    ("Total token throughput (tok/s)", "total_tokens_per_s"),
]


def table(result: dict) -> str:
    """The printed summary, as a markdown table (rows start with "|", ready for RESULTS.md): the
    totals, then mean/median/p99 of TTFT, TPOT and ITL, in vLLM `bench serve`'s words."""
    rows = [(label, result[key]) for label, key in _ROWS if key in result]
    for name, key in (("TTFT", "ttft"), ("TPOT (excl. 1st token)", "tpot"), ("ITL", "itl")):
        rows += [(f"{stat.capitalize()} {name} (ms)", f"{result[f'{stat}_{key}_ms']:.2f}")
                 for stat in ("mean", "median", "p99")]
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'Serving benchmark':<{width}} | {'value':>10} |", f"|{'-' * (width + 2)}|{'-' * 11}:|"]
    return "\n".join(lines + [f"| {label:<{width}} | {value!s:>10} |" for label, value in rows])
