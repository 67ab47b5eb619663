"""Tensor parallelism through the real engine on CPU meshes: `LLM(..., tensor_parallel_size=N)` with
the synchronous runner gives the same greedy tokens (and logprobs within float tolerance) as tp=1,
for a Llama and a Qwen tiny checkpoint, on 2 and 4 devices, with fewer KV heads than devices
(llama3 at tp=4: 2 KV heads; qwen2 with 1 KV head at tp=2); so do two processes on loopback, each
holding one device of a tp=2 mesh (`jax.distributed`). Bad sizes fail at startup, naming the reason.

NOTE: one token bucket and one page bucket keep each engine to a single forward compile; the tp=1
references are shared per module. Every step blocks (async_scheduling=False: jax-notes item 11).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.e2e.conftest import assert_pool_free
from tests.fixtures import fixture_tokenizer
from tests.models.hf_tiny import make_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENGINE = dict(dtype="float32", compilation_cache_dir="", seed=0, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=32, token_buckets=[32], async_scheduling=False)
RNG = np.random.default_rng(5)
# Lengths around the 32-token budget: the longer prompts are prefilled in chunks.
PROMPTS = [RNG.integers(3, 320, n).tolist() for n in (5, 23, 40, 61)]
SAMPLING = dict(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
# family -> (checkpoint overrides, tokenizer): token ids only matter, any tokenizer decodes ids < 320.
FAMILIES = {"llama3": ({}, "llama3"), "qwen2": ({"num_key_value_heads": 1}, "qwen2.5")}
MP_TIMEOUT_S = 300  # a hung multi-process run fails after this


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: make_checkpoint(family, tmp_path_factory.mktemp(family), **overrides)
            for family, (overrides, _) in FAMILIES.items()}


def _options(family: str) -> dict:
    return {**ENGINE, "tokenizer": str(fixture_tokenizer(FAMILIES[family][1]))}


def _generate(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(**SAMPLING), use_tqdm=False)
    assert_pool_free(llm)
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                for o in outputs]
    return tokens, logprobs


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> Callable[[str], tuple[list[list[int]], list[list[float]]]]:
    """family -> tp=1 greedy tokens and logprobs, each computed once."""

    @functools.cache
    def run(family: str) -> tuple[list[list[int]], list[list[float]]]:
        return _generate(LLM(str(checkpoints[family]), tensor_parallel_size=1, **_options(family)))

    return run


@pytest.mark.parametrize(("family", "tp"), [("llama3", 2), ("llama3", 4), ("qwen2", 2)])
def test_engine_tp_matches_one_device(checkpoints, reference, family: str, tp: int) -> None:
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    ref_tokens, ref_logprobs = reference(family)
    llm = LLM(str(checkpoints[family]), tensor_parallel_size=tp, **_options(family))
    model = llm.engine.runner.model
    assert model.mesh.devices.size == tp and not llm.engine.async_scheduling
    assert max(len(x.sharding.device_set) for x in model.leaves) == tp  # really sharded
    fewer_kv_heads = model.arch.num_kv_heads < tp
    assert model.rules.kv_heads == (None if fewer_kv_heads else "tp")  # replicated KV heads, or sharded
    tokens, logprobs = _generate(llm)
    assert tokens == ref_tokens
    assert [len(t) for t in tokens] == [SAMPLING["max_tokens"]] * len(PROMPTS)
    np.testing.assert_allclose(np.array(logprobs), np.array(ref_logprobs), atol=1e-4, rtol=1e-4)


def test_bad_tensor_parallel_sizes_fail_at_startup(checkpoints, tmp_path: Path) -> None:
    llama = str(checkpoints["llama3"])
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the 4 attention heads"):
        LLM(llama, tensor_parallel_size=3, **_options("llama3"))
    with pytest.raises(ValueError, match=f"tensor_parallel_size=8 exceeds the {len(jax.devices())} visible devices"):
        LLM(llama, tensor_parallel_size=8, **_options("llama3"))
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        LLM(llama, tensor_parallel_size=0, **_options("llama3"))
    # 6 query heads, 3 KV heads: tp=2 divides the query heads but not the KV heads (nor they it).
    odd = make_checkpoint("llama3", tmp_path / "odd", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 and the 3 KV heads must divide one another"):
        LLM(str(odd), tensor_parallel_size=2, **_options("llama3"))


def test_bad_distributed_options_fail_at_startup(checkpoints) -> None:
    llama = str(checkpoints["llama3"])
    with pytest.raises(ValueError, match="needs distributed_coordinator as host:port"):
        LLM(llama, num_processes=2, process_id=0, **_options("llama3"))
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        LLM(llama, num_processes=2, process_id=2, distributed_coordinator="127.0.0.1:1", **_options("llama3"))


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (the probe sockets stay open until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Processes:
    """Subprocesses of one multi-process run, each logging to a file; any still running on exit is killed."""

    def __init__(self, tmp_path: Path, commands: list[list[str]]) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}
        self.paths = [tmp_path / f"log{i}.txt" for i in range(len(commands))]
        self.logs = [open(path, "w") for path in self.paths]  # closed in __exit__
        self.procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                      for cmd, log in zip(commands, self.logs, strict=True)]
        self.deadline = time.monotonic() + MP_TIMEOUT_S

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def wait_all(self) -> None:
        """Every process has exited with 0 before the deadline (else fail with the end of their logs)."""
        try:
            for proc in self.procs:
                proc.wait(timeout=max(self.left_s(), 1))
        except subprocess.TimeoutExpired:
            pass
        assert all(p.returncode == 0 for p in self.procs), f"a process failed or hung:\n{self.tails()}"

    def tails(self) -> str:
        return "\n".join(f"--- process {i} (rc {p.poll()}):\n" + path.read_text()[-3000:]
                         for i, (p, path) in enumerate(zip(self.procs, self.paths, strict=True)))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One persistent XLA cache for the multi-process runs: the second run compiles (almost) nothing."""
    return str(tmp_path_factory.mktemp("xla-cache"))


def test_two_processes_on_loopback_match_one(checkpoints, reference, compilation_cache, tmp_path: Path) -> None:
    """Two processes, one CPU device each, run `LLM.generate` on llama3 sharded tp=2 across both."""
    ref_tokens, ref_logprobs = reference("llama3")
    coordinator = f"127.0.0.1:{_free_ports(1)[0]}"
    commands = []
    for pid in range(2):
        engine = {**_options("llama3"), "compilation_cache_dir": compilation_cache, "tensor_parallel_size": 2,
                  "distributed_coordinator": coordinator, "num_processes": 2, "process_id": pid}
        spec = tmp_path / f"spec{pid}.json"
        spec.write_text(json.dumps({"model": str(checkpoints["llama3"]), "engine": engine, "prompts": PROMPTS,
                                    "sampling": SAMPLING}))
        commands.append([sys.executable, "-m", "tests.e2e.tp_worker", str(spec), str(tmp_path / f"out{pid}.json")])
    with Processes(tmp_path, commands) as procs:
        procs.wait_all()
    for pid in range(2):
        out = json.loads((tmp_path / f"out{pid}.json").read_text())
        assert out["mesh_processes"] == [0, 1], "the mesh should span both processes"
        assert out["tokens"] == ref_tokens, f"process {pid}"
        np.testing.assert_allclose(np.array(out["logprobs"]), np.array(ref_logprobs), atol=1e-4, rtol=1e-4)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_two_processes_serve_http_from_process_zero(checkpoints, reference, compilation_cache,
                                                    tmp_path: Path) -> None:
    """`python -m jaxllm.serve` on two processes: process 0 serves HTTP and publishes its engine calls,
    process 1 replays them; completions equal one process's, and both exit 0 after SIGTERM to process 0."""
    ref_tokens, ref_logprobs = reference("llama3")
    coordinator_port, port = _free_ports(2)
    coordinator = f"127.0.0.1:{coordinator_port}"
    options = {**_options("llama3"), "compilation_cache_dir": compilation_cache}
    flags = [str(checkpoints["llama3"]), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
             "-tp", "2", "--distributed-coordinator", coordinator, "--nnodes", "2", "--disable-log-stats"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    commands = [[sys.executable, "-m", "jaxllm.serve", *flags, "--node-rank", str(pid)] for pid in range(2)]
    base = f"http://127.0.0.1:{port}"
    with Processes(tmp_path, commands) as procs:
        while True:  # until process 0 is ready
            assert all(p.poll() is None for p in procs.procs), f"a process exited early:\n{procs.tails()}"
            assert procs.left_s() > 0, f"not ready in time:\n{procs.tails()}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = {"model": "tiny", "temperature": 0.0, "max_tokens": SAMPLING["max_tokens"], "ignore_eos": True,
                "logprobs": 1, "return_tokens_as_token_ids": True}
        for prompts in (PROMPTS, PROMPTS[2:3]):  # a batch, then (after an idle moment) one request alone
            choices = sorted(_post(base + "/v1/completions", {**body, "prompt": prompts})["choices"],
                             key=lambda c: c["index"])
            want = [ref_tokens[PROMPTS.index(p)] for p in prompts]
            assert [[int(t.split(":")[1]) for t in c["logprobs"]["tokens"]] for c in choices] == want
            np.testing.assert_allclose(np.array([c["logprobs"]["token_logprobs"] for c in choices]),
                                       np.array([ref_logprobs[PROMPTS.index(p)] for p in prompts]),
                                       atol=1e-4, rtol=1e-4)
        procs.procs[0].send_signal(signal.SIGTERM)
        procs.wait_all()  # process 1 stops when process 0's engine does
