"""A request's structured-output constraint: `response_format`, vLLM's `structured_outputs`, or the grammar
of a forced tool call, checked by compiling it before the request reaches the engine.

The compile runs in a worker thread (llguidance releases the GIL) and is cached, so the engine, which
compiles again for each request it admits, gets a cache hit and its loop never waits on a big schema.
A request without a constraint never gets here.
"""

from __future__ import annotations

import asyncio

from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.structured import ToolChoiceConstraint, compile_grammar, structured_outputs_from_request
from serve.engine_client import EngineClient
from serve.errors import APIError
from serve.protocol import SamplingFields


def requested_structured_outputs(
    request: SamplingFields, tool_constraint: ToolChoiceConstraint | None = None
) -> tuple[StructuredOutputsParams | None, str]:
    """The constraint the request asks for (None: free text), and the request field it came from."""
    param = "structured_outputs" if request.structured_outputs else "response_format"
    try:
        spec = structured_outputs_from_request(request.response_format, request.structured_outputs)
    except ValueError as e:
        raise APIError(str(e), param=param) from e
    if tool_constraint is None:
        return spec, param
    if spec is not None:
        # NOTE: vLLM lets a forced tool's schema replace a json response_format silently and fails on other
        # kinds; one rule is clearer: a forced call is the whole output, so the two never combine.
        raise APIError("You can only either use constraints for structured outputs or tools, not both.",
                       param=param)
    return tool_constraint.structured_outputs, "tools"  # a forced call is as valid as the tools' schemas


async def check_compiles(engine: EngineClient, spec: StructuredOutputsParams, param: str) -> None:
    """A 400 naming the construct when the grammar engine cannot compile `spec` for this model."""
    # NOTE: compiled with the engine's stop tokens, the ids it compiles with, so its compile is the cached one.
    # An engine that does not say them (AsyncEngine today) gets the tokenizer's EOS here and compiles again.
    eos = sorted(getattr(engine, "eos_token_ids", None) or []) or None
    try:
        await asyncio.to_thread(compile_grammar, spec, engine.tokenizer, engine.vocab_size, eos)
    except ValueError as e:
        raise APIError(str(e), param=param) from e
