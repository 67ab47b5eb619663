"""jaxllm: an LLM inference server on JAX/XLA (paged attention, continuous batching, OpenAI API).

`from jaxllm import LLM, SamplingParams`. Exports are lazy so that `import jaxllm.engine` and
the HTTP layer never pull in jax.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "jaxllm.llm",
    "SamplingParams": "jaxllm.sampling_params",
    "BeamSearchParams": "jaxllm.beam_search",
    "StructuredOutputsParams": "jaxllm.sampling_params",
    "RequestOutput": "jaxllm.outputs",
    "CompletionOutput": "jaxllm.outputs",
    "EngineConfig": "jaxllm.config",
}

__all__ = [*_EXPORTS, "__version__"]

# NOTE: transformers warns at import, in each process, that PyTorch is missing: jaxllm only uses its
# tokenizers and configuration files, which need no PyTorch. Its other warnings stay.
logging.getLogger("transformers").addFilter(lambda record: not record.getMessage().startswith("PyTorch was not found"))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
