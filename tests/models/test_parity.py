"""Models vs HF transformers on tiny random checkpoints of each family (fp32).

A 420-token prompt (short prompts hide RoPE bugs) is prefilled in two chunks through the page
pool, then 8 greedy tokens are decoded one step at a time. Logits at every position must match
transformers' on the same token sequence, and the greedy tokens must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.runner.model_loading import load_model
from tests.models.hf_tiny import FAMILIES, hf_logits, make_checkpoint
from tests.paged import PagedRunner

PROMPT_LEN = 420
CHUNKS = [173, 247]  # off page boundaries on purpose
NUM_DECODE = 8
# fp32 on CPU: observed max abs differences are ~1e-5 on logits of magnitude ~5-20.
ATOL = 2e-4
RTOL = 2e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    family = request.param
    model_dir = make_checkpoint(family, tmp_path_factory.mktemp(family))
    prompt = np.random.default_rng(1).integers(3, 320, PROMPT_LEN).tolist()
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"), ParallelConfig())
    ours, decoded = PagedRunner(loaded, "xla").run(prompt, CHUNKS, NUM_DECODE)
    return family, model_dir, loaded, prompt, ours, decoded


def test_logits_match_transformers(family_run):
    family, model_dir, _, prompt, ours, decoded = family_run
    ref = hf_logits(model_dir, prompt + decoded).numpy()
    # Every prompt position and every decode step (the last decoded token's logits are the ninth).
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL, err_msg=family)
    hf_greedy = [int(np.argmax(ref[PROMPT_LEN - 1 + i])) for i in range(NUM_DECODE)]
    assert decoded == hf_greedy


def test_xla_path_equals_reference(family_run):
    family, _, loaded, prompt, ours, _ = family_run
    ref, _ = PagedRunner(loaded, "reference").run(prompt, CHUNKS, NUM_DECODE)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4, err_msg=family)
