"""Request fields -> `SamplingParams`: request value, else the model's generation-config default,
else OpenAI's default (vLLM's order). Unsupported features are rejected here with a clear 400; the
structured-output constraint is built and checked in `serve.structured`."""

from __future__ import annotations

from typing import Any

from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from serve.errors import APIError, from_sampling_error, not_supported
from serve.protocol import SamplingFields

# OpenAI's defaults for fields a request may leave unset (vLLM's _DEFAULT_SAMPLING_PARAMS).
_OPENAI_DEFAULTS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}


def reject_unsupported(request: SamplingFields) -> None:
    if request.use_beam_search:
        raise not_supported("Beam search", "use_beam_search")
    if request.priority != 0:
        raise APIError("Priority scheduling is not enabled in jaxllm; leave `priority` at 0.", param="priority")


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    model_defaults: dict[str, Any],
    vocab_size: int,
    structured_outputs: StructuredOutputsParams | None = None,
    keep_special_tokens: bool = False,
    logprobs_param: str = "logprobs",
) -> SamplingParams:
    """`keep_special_tokens`: a tool parser needs the call markers in the text (vLLM's adjust_request).
    `logprobs_param`: the request field `logprobs` came from, for the error."""
    for value, param, kind in ((logprobs, logprobs_param, "sample"), (prompt_logprobs, "prompt_logprobs", "prompt")):
        if value is not None and value > MAX_LOGPROBS:
            raise APIError(f"Requested {kind} logprobs of {value}, which is greater than max allowed: "
                           f"{MAX_LOGPROBS}", param=param)
    # NOTE: vLLM v1 detokenizes fast tokenizers with the Rust DecodeStream, which never spaces out added
    # tokens; jaxllm's engine takes its Python window detokenizer when special tokens are kept, which does
    # unless told not to (" <tool_call>" would leave a stray " " of content before every call).
    values = {
        name: value if (value := getattr(request, name)) is not None else model_defaults.get(name, default)
        for name, default in _OPENAI_DEFAULTS.items()
    }
    if isinstance(values["top_k"], int) and values["top_k"] >= vocab_size:
        values["top_k"] = 0  # vLLM's: all of the vocabulary is no limit (and the runner packs top_k as int32)
    try:
        logit_bias = {int(k): v for k, v in request.logit_bias.items()} if request.logit_bias else None
    except ValueError as e:
        raise APIError("logit_bias keys must be token ids (integers as strings).", param="logit_bias") from e
    try:
        params = SamplingParams(
            n=1 if request.n is None else request.n,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens and not keep_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens and not keep_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logit_bias=logit_bias,
            allowed_token_ids=request.allowed_token_ids,
            bad_words=request.bad_words,
            structured_outputs=structured_outputs,
            **values,
        )
        params.validate_vocab(vocab_size)
    except ValueError as e:
        raise from_sampling_error(e) from e
    return params
