"""Soak test: N concurrent clients mixing streams, disconnects, fan-out and bad bodies for T seconds.

    python -m bench.soak [--base-url http://127.0.0.1:8000] --clients 32 --duration 600 [--api-key KEY]
        [--output-json soak.json]

Without --base-url it starts `python -m jaxllm.serve` itself (the bundled stories260K, --max-model-len 256,
its log in a temporary file) and stops it at the end. Each client loops over requests drawn from a fixed mix
(seeded): streamed completions and chats read to `[DONE]`, streams dropped after a few events, `n` > 1,
prompt lists, whole chats, and bad bodies that must each get a 4xx.

The report: the status histogram per kind (a transport error counts under its exception's name), the
resident memory of the server's processes (the HTTP process and its children, the engine among them, found
through /proc from the listening port: at the start, the peak sampled every 0.25 s, at each tenth of the
run, at the end, and the kernel's high-water mark), and, once the load stops, how long /metrics took to show
no running or waiting request and an empty KV pool, and whether a greedy request answers as it did before the
soak; for a server it started, the tracebacks in its log. The exit status is 1 when a request got a 5xx or an
unexpected status, the server did not settle, or its log holds a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

GREEDY = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
JSON = "application/json"

# Bodies a server must refuse with a 4xx: (path, body bytes, content type).
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": ', JSON),
    ("/v1/completions", b'{"prompt": "Hi", "n": 1000000, "max_tokens": 1}', JSON),
    ("/v1/completions", b'{"prompt": "Hi", "temperature": 1e39}', JSON),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": "many"}', JSON),
    ("/v1/completions", b'{"prompt": "Hi", "seed": ' + b"9" * 5000 + b"}", JSON),
    ("/v1/completions", json.dumps({"prompt": [[7]] * 5000}).encode(), JSON),
    ("/v1/completions", json.dumps({"prompt": "word " * 40_000}).encode(), JSON),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON),
    ("/v1/completions", b'{"prompt": "Hi"}', "text/plain"),
    ("/v1/chat/completions", b'{"messages": "hello"}', JSON),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "response_format": {
        "type": "structural_tag", "structures": [1], "triggers": [2]}}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "allowed_token_ids": [10**9]}).encode(), JSON),
    ("/tokenize", b'{"prompt": 12}', JSON),
    ("/detokenize", b'{"tokens": [-1]}', JSON),
]


@dataclass
class Tally:
    """Outcomes per request kind; `failed` counts those no request of its kind should get (a few kept)."""

    statuses: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    failed: int = 0
    examples: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, kind: str, outcome: str, expected: bool, detail: str = "") -> None:
        self.statuses[kind][outcome] += 1
        self.count += 1
        if not expected:
            self.failed += 1
            if len(self.examples) < 20:
                self.examples.append(f"{kind}: {outcome} {detail[:300]}")


# ---- the clients ----


async def streamed(client: httpx.AsyncClient, tally: Tally, kind: str, path: str, body: dict[str, Any],
                   drop_after: int | None) -> None:
    """A stream read to `[DONE]`, or dropped after `drop_after` events (the connection closed under it)."""
    events = 0
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            tally.add(kind, str(response.status_code), False, response.text)
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                tally.add(kind, "200", True)
                return
            if "error" in json.loads(line[len("data: "):]):
                tally.add(kind, "200 error event", False, line)
            if drop_after is not None and events >= drop_after:
                tally.add(kind, "200 dropped", True)
                return
    tally.add(kind, "200 no [DONE]", False)


async def whole(client: httpx.AsyncClient, tally: Tally, kind: str, path: str, body: dict[str, Any],
                choices: int) -> None:
    response = await client.post(path, json=body)
    ok = response.status_code == 200 and len(response.json()["choices"]) == choices
    tally.add(kind, str(response.status_code), ok, response.text)


async def bad(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    path, body, content_type = rng.choice(BAD_BODIES)
    response = await client.post(path, content=body, headers={"Content-Type": content_type})
    tally.add("bad body", str(response.status_code), 400 <= response.status_code < 500 and is_error_json(response),
              f"{path} {body[:120]!r} -> {response.text}")


def is_error_json(response: httpx.Response) -> bool:
    try:
        return set(response.json()["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


async def one_request(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    max_tokens = rng.randint(4, 48)
    prompt = rng.choice(["Once upon a time", "The cat", "Lily went to the park", "A big red ball"])
    kind = rng.choices(["stream", "chat stream", "disconnect", "n > 1", "prompt list", "chat", "bad body"],
                       weights=[3, 2, 2, 1, 1, 1, 2])[0]
    completion = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randint(0, 99)}
    if kind == "stream":
        await streamed(client, tally, kind, "/v1/completions",
                       {**completion, "stream_options": {"include_usage": True}}, None)
    elif kind == "chat stream":
        await streamed(client, tally, kind, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": max_tokens},
                       None)
    elif kind == "disconnect":
        await streamed(client, tally, kind, "/v1/completions", {**completion, "max_tokens": 200},
                       rng.randint(1, 4))
    elif kind == "n > 1":
        n = rng.randint(2, 6)
        await whole(client, tally, kind, "/v1/completions", {**completion, "n": n}, n)
    elif kind == "prompt list":
        prompts = [prompt] * rng.randint(2, 6)
        await whole(client, tally, kind, "/v1/completions", {**completion, "prompt": prompts}, len(prompts))
    elif kind == "chat":
        await whole(client, tally, kind, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": max_tokens}, 1)
    else:
        await bad(client, tally, rng)


async def client_loop(base_url: str, headers: dict[str, str], tally: Tally, seed: int, until: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        while time.monotonic() < until:
            try:
                await one_request(client, tally, rng)
            except httpx.HTTPError as e:
                tally.add("transport", type(e).__name__, False, str(e))


# ---- the server's processes ----


def listening_pid(port: int) -> int:
    """The pid holding the TCP socket that listens on `port` (from /proc/net/tcp*)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if int(columns[1].rsplit(":", 1)[1], 16) == port and columns[3] == "0A":  # 0A: LISTEN
                inodes.add(columns[9])
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (pid_dir / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return int(pid_dir.name)
    raise RuntimeError(f"no process of this user listens on port {port}")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: int(value.split()[0]) for key, value in (line.split(":", 1) for line in lines)
            if key in ("VmRSS", "VmHWM")}


def maps_jax(pid: int) -> bool:
    try:
        return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class ProcessWatch:
    """The HTTP process and its children (the engine, render workers): RSS at start, sampled peak, at the end,
    and at each tenth of the run (a leak shows as a climb after the warm-up)."""

    def __init__(self, http_pid: int) -> None:
        self.http_pid = http_pid
        self.start: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.high_water: dict[int, int] = {}
        self.timeline: dict[int, list[int]] = collections.defaultdict(list)

    def pids(self) -> list[int]:
        return [self.http_pid, *children(self.http_pid)]

    def sample(self) -> None:
        for pid in self.pids():
            try:
                memory = memory_kb(pid)
            except OSError:
                continue
            self.start.setdefault(pid, memory["VmRSS"])
            self.peak[pid] = max(self.peak.get(pid, 0), memory["VmRSS"])
            self.last[pid] = memory["VmRSS"]
            self.high_water[pid] = memory["VmHWM"]

    async def run(self, started: float, until: float) -> None:
        tenth = (until - started) / 10
        next_mark = started
        while time.monotonic() < until:
            self.sample()
            if time.monotonic() >= next_mark:
                for pid, rss in self.last.items():
                    self.timeline[pid].append(rss)
                next_mark += tenth
            await asyncio.sleep(0.25)

    def label(self, pid: int) -> str:
        if pid == self.http_pid:
            return "HTTP process"
        if maps_jax(pid):
            return "engine child"
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return "child (exited)"
        return "resource tracker" if b"resource_tracker" in command else "other child (render worker)"

    def report(self) -> list[dict[str, Any]]:
        return [{"pid": pid, "process": self.label(pid), "start_mb": self.start[pid] / 1024,
                 "peak_mb": self.peak[pid] / 1024, "end_mb": self.last[pid] / 1024,
                 "high_water_mb": self.high_water[pid] / 1024,
                 "each_tenth_mb": [round(rss / 1024) for rss in self.timeline[pid]]} for pid in self.peak]


# ---- settling ----


def gauges(metrics_text: str) -> dict[str, float]:
    """num_requests_running / num_requests_waiting / kv_cache_usage_perc, whatever the names' prefix."""
    wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].split(":")[-1]
        if name in wanted:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


async def settle(client: httpx.AsyncClient, timeout_s: float) -> tuple[dict[str, float], float | None]:
    """The gauges once all are 0 (and the seconds that took), or the last reading after `timeout_s` (None)."""
    started = time.monotonic()
    while True:
        values = gauges((await client.get("/metrics")).text)
        if values and not any(values.values()):
            return values, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return values, None
        await asyncio.sleep(0.2)


async def greedy_text(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/completions", json=GREEDY)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


# ---- the run ----


async def soak(base_url: str, api_key: str | None, clients: int, duration_s: float, seed: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    watch = ProcessWatch(listening_pid(urlparse(base_url).port or 80))
    tally = Tally()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as control:
        before = await greedy_text(control)
        load_before = os.getloadavg()[0]
        watch.sample()
        started = time.monotonic()
        until = started + duration_s
        await asyncio.gather(watch.run(started, until), *(client_loop(base_url, headers, tally, seed * 1000 + i, until)
                                                 for i in range(clients)))
        elapsed = time.monotonic() - started
        load_after = os.getloadavg()[0]
        end_gauges, settle_s = await settle(control, timeout_s=60)
        after = await greedy_text(control)
        watch.sample()
    return {
        "clients": clients, "duration_s": round(elapsed, 1), "requests": tally.count,
        "requests_per_s": round(tally.count / elapsed, 1),
        "statuses": {kind: dict(counts) for kind, counts in sorted(tally.statuses.items())},
        "failures": tally.failed, "failure_examples": tally.examples,
        "processes": watch.report(), "end_gauges": end_gauges,
        "settled_after_s": None if settle_s is None else round(settle_s, 2),
        "greedy_same_after": before == after,
        "load_average_1min": [load_before, load_after],
    }


def start_server(max_model_len: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "jaxllm.serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}); see {log_path}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return server, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not start in 600 s; see {log_path}")


def print_report(result: dict[str, Any]) -> None:
    print(f"{result['clients']} clients, {result['duration_s']} s: {result['requests']} requests "
          f"({result['requests_per_s']}/s); 1-minute load average {result['load_average_1min'][0]:.1f} at the "
          f"start, {result['load_average_1min'][1]:.1f} at the end, on {os.cpu_count()} CPUs")
    for kind, counts in result["statuses"].items():
        print(f"  {kind:12s} " + ", ".join(f"{outcome}: {n}" for outcome, n in sorted(counts.items())))
    for example in result["failure_examples"]:
        print(f"  UNEXPECTED {example}")
    for process in result["processes"]:
        print(f"  {process['process']} (pid {process['pid']}): RSS {process['start_mb']:.0f} MB at the start, "
              f"peak {process['peak_mb']:.0f} MB, {process['end_mb']:.0f} MB at the end "
              f"(kernel high-water mark {process['high_water_mb']:.0f} MB); at each tenth of the run: "
              f"{process['each_tenth_mb']} MB")
    end = result["end_gauges"]
    print(f"  after the load: {end.get('num_requests_running')} running, {end.get('num_requests_waiting')} waiting, "
          f"{100 * (1 - end.get('kv_cache_usage_perc', 1)):.1f}% of KV pages free, settled after "
          f"{result['settled_after_s']} s; greedy answer unchanged: {result['greedy_same_after']}")
    if "server_log_tracebacks" in result:
        print(f"  server log: {result['server_log_tracebacks']} tracebacks ({result['server_log']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server; default: start one (the bundled model, on CPU)")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=256, help="of the server this script starts")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    server = None
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    base_url = args.base_url
    if base_url is None:
        server, base_url = start_server(args.max_model_len, log_path)
    try:
        result = asyncio.run(soak(base_url.rstrip("/"), args.api_key, args.clients, args.duration, args.seed))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    if server is not None:
        result["server_log"] = str(log_path)
        result["server_log_tracebacks"] = log_path.read_text(errors="replace").count("Traceback")
    print_report(result)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    settled = result["settled_after_s"] is not None and result["greedy_same_after"]
    sys.exit(0 if result["failures"] == 0 and settled and not result.get("server_log_tracebacks") else 1)


if __name__ == "__main__":
    main()
