"""`use_beam_search` on /v1/completions and /v1/chat/completions, as vLLM 0.34.0 serves it: `n` is the beam
width, and the reply is one final output of n choices, best first (`jaxllm.beam_search` ranks them).

    check_beam_search(request, constraint_param=...)        the 400s (check_completion_beam_search: a completion's)
    start_beam_search(engine, prompts, request, ids, ...)  -> (prompt index, RequestOutput), as start_generation

Each step submits every live beam to the engine as a request for one token; the endpoint folds the final
output into its reply as it does any other. A disconnect cancels the waiting task, which closes the step's
streams: every beam still in the engine is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from jaxllm.beam_search import BeamSearch, BeamSearchParams
from jaxllm.engine.client import EngineClient, GenerationStream
from jaxllm.engine.detokenizer import make_incremental_detokenizer
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from serve.errors import APIError, generation_error, not_supported
from serve.inputs import EnginePrompt
from serve.protocol import CompletionRequest, SamplingFields
from serve.streaming import merge_outputs

# vLLM's default temperature for a beam search request that sets none and whose model has no default.
_DEFAULT_TEMPERATURE = 1.0


def check_beam_search(request: SamplingFields, *, constraint_param: str | None) -> None:
    """The 400s of a beam search request the server cannot run as asked. `constraint_param`: the field that
    constrains the output (structured outputs, a forced tool call), if any.

    NOTE: vLLM's server drops such a constraint from a beam search without a word; a 400 says it instead."""
    if request.logprob_token_ids:
        raise APIError("`logprob_token_ids` is not supported with beam search.", param="logprob_token_ids")
    if constraint_param is not None:
        raise not_supported("Beam search with structured outputs or forced tool calls", constraint_param)


def check_completion_beam_search(request: CompletionRequest, *, constraint_param: str | None) -> None:
    """A completion's beam search: vLLM's 400s for a stream and for echoed logprobs, then the common ones."""
    if request.stream:
        raise APIError("Streaming is not currently supported with beam search", param=None)
    if request.echo and request.logprobs is not None:
        raise APIError("`echo` with `logprobs` is not supported with beam search because beam search does not "
                       "compute prompt logprobs.", param="echo")
    check_beam_search(request, constraint_param=constraint_param)


def start_beam_search(engine: EngineClient, prompts: list[EnginePrompt], request: SamplingFields,
                      request_ids: list[str], *, max_tokens: int | None,
                      error_params: dict[str, str] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Validate every prompt as a request for `max_tokens` with a step's logprobs (a 400 before the response
    starts; the budget it resolves is the beams' max_tokens), then search each: one final output per prompt."""
    info = engine.info
    searches = []
    try:
        params = _beam_search_params(request, info.default_sampling)
        for prompt, request_id in zip(prompts, request_ids, strict=True):
            command = engine.prepare(prompt.token_ids, params.step_params(max_tokens=max_tokens), request_id,
                                     cache_salt=request.cache_salt,
                                     default_max_tokens=info.default_sampling.get("max_tokens"))
            searches.append(_search(engine, prompt, dataclasses.replace(params, max_tokens=command.max_tokens),
                                    request_id, request.cache_salt))
    except Exception as e:
        # A step's logprobs are what `n` (or allowed_token_ids) asks for: a 400 about them names that field.
        names = {**(error_params or {}), "logprobs": "n", "logprob_token_ids": "allowed_token_ids"}
        raise generation_error(e, engine_dead=engine.is_dead, params=names) from e
    return merge_outputs(searches)


def _beam_search_params(request: SamplingFields, model_defaults: dict[str, Any]) -> BeamSearchParams:
    """vLLM's `to_beam_search_params`: the request's fields, the model's temperature when it sets none; max_tokens
    as the request asks, 1 until validation resolves it."""
    temperature = request.temperature
    if temperature is None:
        temperature = model_defaults.get("temperature", _DEFAULT_TEMPERATURE)
    return BeamSearchParams(beam_width=1 if request.n is None else request.n, max_tokens=1,
                            ignore_eos=request.ignore_eos, temperature=temperature,
                            length_penalty=request.length_penalty,
                            include_stop_str_in_output=request.include_stop_str_in_output,
                            skip_special_tokens=request.skip_special_tokens,
                            allowed_token_ids=request.allowed_token_ids)


async def _search(engine: EngineClient, prompt: EnginePrompt, params: BeamSearchParams, request_id: str,
                  cache_salt: str | None) -> AsyncIterator[RequestOutput]:
    info = engine.info
    search = BeamSearch(prompt.token_ids, params, info.eos_token_ids, info.max_model_len)
    step_params = params.step_params()
    while not search.done:
        streams = [engine.generate(beam.tokens, step_params, f"{request_id}-beam-{search.num_steps}-{i}",
                                   cache_salt=cache_salt) for i, beam in enumerate(search.live)]
        try:
            results = await asyncio.gather(*(_next_token(stream) for stream in streams))
        finally:
            for stream in streams:  # aborts those still in the engine (a disconnect cancelled the gather)
                with contextlib.suppress(Exception):
                    await stream.aclose()
        if any(top is None for top in results):
            search.abort()
        else:
            search.advance(results)
    outputs = []
    for index, beam in enumerate(search.best()):
        token_ids = search.generated_token_ids(beam)
        # NOTE: decoded after the prompt, as the engine decodes any output; vLLM decodes the ids alone, which
        # loses a SentencePiece tokenizer's leading space (" upon" comes out "upon").
        detokenizer = make_incremental_detokenizer(info.tokenizer, prompt.token_ids, params.skip_special_tokens)
        outputs.append(CompletionOutput(index, detokenizer.decode_all(token_ids), token_ids, beam.cum_logprob,
                                        beam.logprobs[:len(token_ids)], beam.finish_reason, beam.stop_reason))
    yield RequestOutput(request_id, prompt.text, prompt.token_ids, outputs, finished=True)


async def _next_token(stream: GenerationStream) -> dict[int, Logprob] | None:
    """The top-logprob dict of a one-token request's token; None when it was aborted."""
    positions: list[dict[int, Logprob]] = []
    async for output in stream:
        if output.outputs[0].finish_reason == "abort":
            return None
        positions += output.outputs[0].logprobs or []
    return positions[0]
