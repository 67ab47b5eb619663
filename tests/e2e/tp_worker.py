"""One process of a multi-process run, started by tests/e2e/test_tensor_parallel_cpu.py:

    python -m tests.e2e.tp_worker SPEC.json OUT.json

SPEC holds the model, the `LLM(...)` options (the distributed ones included), the prompts (token
ids) and the sampling params; OUT gets each request's greedy tokens and their logprobs, and the
processes owning the mesh's devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from jaxllm import LLM, SamplingParams

    llm = LLM(spec["model"], **spec["engine"])
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], SamplingParams(**spec["sampling"]),
                           use_tqdm=False)
    mesh = llm.engine.runner.model.mesh
    result = {
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                     for o in outputs],
        "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
