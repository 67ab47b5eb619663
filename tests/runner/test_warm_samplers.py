"""Every sampler variant a README example needs is compiled at warm-up: a newcomer's first request
never waits for a compile (it took 17.5 s on CPU)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from jaxllm.runner.compilation import warm_sampler_flags
from jaxllm.runner.input_batch import CachedRequestState, sampler_flags
from jaxllm.runner.sampler import LogprobWidths
from jaxllm.sampling_params import SamplingParams

README = Path(__file__).parents[2] / "README.md"
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"structured_outputs"}


def _readme_sampling() -> list[dict]:
    """The sampling fields README's Python examples send: `extra_body={...}` and `SamplingParams(...)`."""
    found = []
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "SamplingParams":
                fields = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            else:
                fields = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "extra_body"), {})
            if fields := {k: v for k, v in fields.items() if k in SAMPLING_FIELDS and k != "max_tokens"}:
                found.append(fields)
    return found


def _flags(params: SamplingParams):
    state = CachedRequestState("r", [1, 5], 2, params, seed=0, page_ids=[0])
    return sampler_flags([state], bitmask_rows=False, logprob_widths=LogprobWidths.of(20, 512))


@pytest.mark.parametrize("default", [None, SamplingParams(), SamplingParams(temperature=0.6, top_p=0.9),
                                     SamplingParams(temperature=0.0)])
def test_every_readme_example_is_warm_alone_and_over_the_defaults(default) -> None:
    found = _readme_sampling()
    assert {"top_k": 20, "repetition_penalty": 1.05} in found  # the openai client example
    warm = warm_sampler_flags(default)
    for fields in found:
        assert _flags(SamplingParams(**fields)) in warm, fields  # offline: the example as given
        served = (default or SamplingParams()).clone(**fields)  # served: unset fields from the defaults
        assert _flags(served) in warm, fields
