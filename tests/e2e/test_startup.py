"""Start-up: a served engine starts with its smallest bucket ready and loads the rest in the
background (the offline engine's tokens while they load; no compile once they are in); the
activation estimate is kept beside the compilation cache; the start-up log, one line per phase."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.build import build_engine
from jaxllm.config import DEFAULT_MODEL, EngineConfig
from jaxllm.engine.core import EngineInfo
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.runner.compilation import activation_bytes
from jaxllm.runner.model_loading import human_count
from jaxllm.sampling_params import RequestOutputKind
from tests.e2e.conftest import COMMON, backend_compiles

# The `llm` fixture's engine options, so the two engines compile the same buckets.
OPTIONS = dict(max_num_seqs=64, max_num_batched_tokens=128, token_buckets=[16, 64, 128])


def _generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    info = EngineInfo.describe(engine)
    params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
    for i, prompt in enumerate(prompts):
        engine.add_request(info.new_request(str(i), prompt, params))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.sequences[0].token_ids)
    return [done[str(i)] for i in range(len(prompts))]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _jaxllm_log() -> Iterator[list[str]]:
    """The messages jaxllm's loggers write at INFO and above inside the block (filled as they come)."""
    handler, root = _Lines(), logging.getLogger("jaxllm")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LLMEngine, list[str]]]:
    """A served engine, and what it logs from its build on."""
    with _jaxllm_log() as lines:
        engine = build_engine(EngineConfig.from_kwargs(model=DEFAULT_MODEL, **OPTIONS, **COMMON), served=True).engine
        yield engine, lines
        engine.runner.shutdown()


def _one(lines: list[str], pattern: str) -> re.Match:
    found = [match for line in lines if (match := re.match(pattern, line))]
    assert len(found) == 1, (pattern, lines)
    return found[0]


def test_served_engine_serves_while_buckets_load(served, llm):
    engine, log = served
    runner = engine.runner
    compiler = runner.compiler
    smallest = {("forward", 16, pages) for pages in runner.buckets.pages}
    assert smallest <= compiler.ready() and not smallest & compiler.loading()
    assert not compiler.loading()  # nothing loads before the engine's loop starts
    state = runner.compile_state()  # the status page's view
    assert [(t, p) for t, p, _ in state.forward_buckets] == runner.buckets.keys and state.samplers_loaded > 0
    assert {(t, p) for t, p, loaded in state.forward_buckets if loaded} == {key[1:] for key in smallest}
    engine.start_background_work()  # as the loop does
    forward = {key[1:] for key in compiler.ready() | compiler.loading() if key[0] == "forward"}
    assert forward == set(runner.buckets.keys)

    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 512, int(n)).tolist()] for n in rng.integers(1, 120, 24)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    tokens = _generate(engine, prompts, greedy)  # big prefill steps wait for their buckets
    offline = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                             use_tqdm=False)]
    assert tokens == offline

    compiler.wait_warm()
    assert not compiler.loading()
    assert all(loaded for *_, loaded in runner.compile_state().forward_buckets)
    with backend_compiles() as compiles:
        _generate(engine, prompts, greedy)
    assert compiles == []
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages

    deadline = time.monotonic() + 5  # the loaders' line comes from a thread, once the last bucket is in
    done_line = r"Compiled (\d+) forward buckets \(.*\), the last (\d+) in the background,"
    while not any(re.match(done_line, line) for line in log) and time.monotonic() < deadline:
        time.sleep(0.01)
    done = _one(log, done_line)
    keys, first = len(runner.buckets.keys), len(runner.buckets.pages)  # the smallest token bucket's came first
    assert [int(n) for n in done.groups()] == [keys, keys - first]


def test_a_new_sampling_mix_runs_beside_its_compile_with_the_same_tokens(served, llm):
    """Issue 21: a sampler variant first needed after warm-up stalled every request's steps 0.4-1.7 s. Now it
    compiles on a thread while the steps run the stand-in, which gives the tokens the variant gives offline."""
    engine, _ = served
    compiler = engine.runner.compiler
    compiler.wait_warm()  # the stand-in is in
    prompts = [[1, 5, 9, 13, 17], [1, 40, 41]]
    new_mix = SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=2, max_tokens=8)
    with backend_compiles() as compiles:
        started = time.perf_counter()
        tokens = _generate(engine, prompts, new_mix)
        elapsed = time.perf_counter() - started
        compiler.wait_warm()  # its own compile, still on its thread
    assert len(compiles) == 1, "only the new variant compiles (the stand-in's inputs were warmed with it)"
    assert elapsed < compiles[0], f"the steps took {elapsed:.2f} s, its compile {compiles[0]:.2f} s"
    offline = llm.generate([{"prompt_token_ids": p} for p in prompts], new_mix, use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in offline]
    assert _generate(engine, prompts, new_mix) == tokens  # now with the variant itself


def test_startup_log_has_one_line_per_phase(served):
    engine, log = served
    buckets = engine.runner.buckets
    ready = _one(log, r"Engine ready in ")
    startup = log[: log.index(ready.string) + 1]
    _one(startup, r"Loaded the tokenizer \(512 tokens\)")
    weights = _one(startup, r"Loaded LlamaForCausalLM \((\S+) params")
    assert weights[1] == human_count(sum(leaf.size for leaf in engine.runner.model.leaves)) == "260K"
    _one(startup, rf"KV cache: {engine.block_manager.num_pages} pages ")
    first = _one(startup, r"The 16-token buckets \((\d+) of (\d+) forward buckets\) compiled .* the other (\d+) load")
    assert [int(n) for n in first.groups()] == [len(buckets.pages), len(buckets.keys),
                                                len(buckets.keys) - len(buckets.pages)]


def test_a_fresh_process_probes_no_tpu_and_sends_no_pytorch_warning():
    """As where PyTorch and libtpu are not installed and JAX_PLATFORMS is not set: jaxllm's start (its
    tokenizer module, then the platforms it selects) logs neither transformers' PyTorch warning nor
    jax's failed probe of the TPU."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # find_spec('torch') -> None: transformers sees no PyTorch
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import jaxllm.tokenizer\n"
        "from jaxllm.runner.platforms import select_jax_platforms\n"
        "select_jax_platforms()\n"
        "import jax; print(jax.devices()[0].platform)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
    assert "PyTorch was not found" not in done.stderr and "Unable to initialize backend" not in done.stderr, done.stderr


def test_activation_estimate_is_kept_beside_the_compilation_cache(llm, tmp_path):
    runner = llm.engine.runner
    first = activation_bytes(runner.model, runner.attention, runner.buckets, str(tmp_path))
    (kept,) = tmp_path.glob("jaxllm-activation-*.json")
    assert first > 0 and json.loads(kept.read_text()) == {"temp_size_in_bytes": first}
    kept.write_text(json.dumps({"temp_size_in_bytes": 12345}))  # proves the second call reads it
    with backend_compiles() as compiles:
        assert activation_bytes(runner.model, runner.attention, runner.buckets, str(tmp_path)) == 12345
    assert compiles == []
    assert activation_bytes(runner.model, runner.attention, runner.buckets, None) == first  # no cache: compiled again
