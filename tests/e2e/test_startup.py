"""Start-up: a served engine starts with its smallest bucket ready and loads the rest in the
background (the offline engine's tokens while they load; no compile once they are in); the
activation estimate is kept beside the compilation cache."""

from __future__ import annotations

import json

import numpy as np

from jaxllm import SamplingParams
from jaxllm.build import build_engine
from jaxllm.config import DEFAULT_MODEL, EngineConfig
from jaxllm.engine.core import EngineInfo
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.runner.compilation import activation_bytes
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


def test_served_engine_serves_while_buckets_load(llm):
    engine = build_engine(EngineConfig.from_kwargs(model=DEFAULT_MODEL, **OPTIONS, **COMMON), served=True).engine
    runner = engine.runner
    compiler = runner.compiler
    smallest = {("forward", 16, pages) for pages in runner.buckets.pages}
    assert smallest <= compiler.ready() and not smallest & compiler.loading()
    assert not compiler.loading()  # nothing loads before the engine's loop starts
    engine.start_background_work()  # as the loop does
    forward = {key[1:] for key in compiler.ready() | compiler.loading() if key[0] == "forward"}
    assert forward == set(runner.buckets.keys)

    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 512, int(n)).tolist()] for n in rng.integers(1, 120, 24)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    served = _generate(engine, prompts, greedy)  # big prefill steps wait for their buckets
    offline = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                             use_tqdm=False)]
    assert served == offline

    compiler.wait_warm()
    assert not compiler.loading()
    with backend_compiles() as compiles:
        _generate(engine, prompts, greedy)
    assert compiles == []
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
    runner.shutdown()


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
