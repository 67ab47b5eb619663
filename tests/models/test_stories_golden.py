"""The real tiny model (stories260K) reproduces its known greedy sample through the page pool."""

from __future__ import annotations

import json
from pathlib import Path

from jaxllm.config import DEFAULT_MODEL, ModelConfig, ParallelConfig
from jaxllm.runner.model_loading import load_model
from tests.paged import PagedRunner

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "stories260K_greedy.json").read_text())


def test_greedy_from_bos_reproduces_the_golden_sample():
    loaded = load_model(ModelConfig(model=DEFAULT_MODEL, dtype="float32"), ParallelConfig())
    prompt = GOLDEN["prompt_token_ids"]
    n = GOLDEN["num_output_tokens"]
    _, decoded = PagedRunner(loaded, "xla").run(prompt, [len(prompt)], n)
    assert decoded == GOLDEN["output_token_ids"]
    assert GOLDEN["text"].startswith("Once upon a time, there was a little girl named Lily.")
