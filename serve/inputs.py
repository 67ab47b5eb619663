"""A request's inputs for the engine: the body parsed, the model checked, the prompt rendered and tokenized,
the sampling params built (request value, else the model's generation-config default, else OpenAI's, as
vLLM orders them), and the structured-output constraint checked by compiling it.

The request against the model (context length, vocabulary, logprobs limits, the KV pool) is validated once,
by the engine client when the request is submitted (`jaxllm.validation`); these are the checks of the HTTP
request's own shape.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request

from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.structured import ToolChoiceConstraint, compile_grammar, structured_outputs_from_request
from jaxllm.validation import ValidationError
from serve import prompt_jobs
from serve.errors import APIError, from_pydantic_error
from serve.prompt_length import InputCharLimit
from serve.protocol import SamplingFields
from serve.render_pool import INLINE_WEIGHT, RenderPool

if TYPE_CHECKING:
    from jaxllm.engine.core import EngineInfo

RequestT = TypeVar("RequestT", bound=BaseModel)

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


@dataclass
class EnginePrompt:
    token_ids: list[int]
    text: str | None  # None when the client sent token ids


# ---- the body ----


def parse(model: type[RequestT], body: Any) -> RequestT:
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except PydanticValidationError as e:
        raise from_pydantic_error(e) from e


def check_model(served_model_names: list[str], name: str | None) -> None:
    if name is not None and name not in served_model_names:
        raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, param="model")


def base_request_id(request: Request, body_id: str | None) -> str:
    """vLLM's rule: the X-Request-Id header, else the body's `request_id`, else a random id."""
    return request.headers.get("x-request-id") or body_id or uuid.uuid4().hex


# ---- prompts ----


async def completion_prompts(pool: RenderPool, prompt: Any, *, add_special_tokens: bool,
                             limit: InputCharLimit | None) -> list[EnginePrompt]:
    """A completions `prompt`: a string, a list of strings, token ids, or a list of token-id lists. A string
    over `limit` is a 400 before any is tokenized; the strings are tokenized on `pool`, off the event loop."""
    if prompt is None or prompt == "" or prompt == []:
        raise APIError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    texts = [item for item in prompt if isinstance(item, str)]
    for text in texts:
        _check_length(text, limit)
    encoded = iter(await pool.run(prompt_jobs.encode_all, texts, weight=sum(map(len, texts)),
                                  add_special_tokens=add_special_tokens) if texts else [])
    return [EnginePrompt(next(encoded), item) if isinstance(item, str) else EnginePrompt(list(item), None)
            for item in prompt]


async def chat_prompt(
    pool: RenderPool,
    messages: list[dict[str, Any]],
    *,
    limit: InputCharLimit | None,
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    tools: list[dict[str, Any]] | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> EnginePrompt:
    """Render with the model's (or --chat-template's) template, then tokenize without special tokens
    (the template writes BOS), as vLLM does, on `pool` (off the event loop). Fed-back tool calls' arguments
    are parsed first. A rendered text over `limit` is a 400 without being tokenized."""
    try:
        text, token_ids = await pool.run(
            prompt_jobs.render_chat, messages, weight=_text_weight(messages, tools, chat_template_kwargs),
            max_chars=limit.max_chars if limit is not None else None, add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tools=tools, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
        )
    except prompt_jobs.TemplateError as e:
        raise APIError(str(e), param="messages") from e
    if token_ids is None:
        _check_length(text, limit)
    return EnginePrompt(token_ids, text)


def _check_length(text: str, limit: InputCharLimit | None) -> None:
    if limit is not None and len(text) > limit.max_chars:
        raise APIError(limit.message(len(text)), param="input_text")


def _text_weight(*values: Any) -> int:
    """About how many characters of text `values` hold (strings' lengths, and a few per item), counted only
    up to the render pool's inline limit: past it, the job goes to a worker whatever its weight."""
    weight = 0
    stack = list(values)
    while stack and weight < INLINE_WEIGHT:
        value = stack.pop()
        weight += len(value) if isinstance(value, str) else 8
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return weight


def truncate_prompt(prompt: EnginePrompt, request: SamplingFields, tokenizer: Any, max_model_len: int) -> EnginePrompt:
    """vLLM's `truncate_prompt_tokens`: keep that many prompt tokens (-1: max_model_len - 1, which holds a token
    of context back for the output), the last ones with `truncation_side` "left", the first with "right"
    (unset: the tokenizer's side). The prompt's text is dropped: a cut prompt reads back from its ids."""
    keep = request.truncate_prompt_tokens
    if keep is None:
        return prompt
    if keep > max_model_len:
        raise APIError(f"truncate_prompt_tokens={keep} cannot be greater than max_model_len = {max_model_len}. "
                       "Please request a smaller truncation size.", param="truncate_prompt_tokens")
    if keep == -1:
        keep = max_model_len - 1
    ids = prompt.token_ids
    if keep >= len(ids):
        return prompt
    side = request.truncation_side or getattr(tokenizer, "truncation_side", "right")
    return EnginePrompt(ids[len(ids) - keep:] if side == "left" else ids[:keep], None)


# ---- sampling params ----


def reject_unsupported(request: SamplingFields) -> None:
    if request.priority != 0:
        raise APIError("Priority scheduling is not enabled in jaxllm; leave `priority` at 0.", param="priority")


def _not_integers(keys: Iterable[str]) -> list[str]:
    """The keys `int()` cannot read (vLLM's message names them all)."""
    bad = []
    for key in keys:
        try:
            int(key)
        except ValueError:
            bad.append(key)
    return bad


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    model_defaults: dict[str, Any],
    vocab_size: int,
    structured_outputs: StructuredOutputsParams | None = None,
    keep_special_tokens: bool = False,
) -> SamplingParams:
    """`max_tokens`: the request's (None: the rest of the context; the model's default caps it when the request
    is submitted). `keep_special_tokens`: a tool parser needs the call markers in the text (vLLM's
    adjust_request)."""
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
        raise APIError("logit_bias contains key(s) that cannot be converted to integer token IDs: "
                       f"{_not_integers(request.logit_bias or {})!r}", param="logit_bias") from e
    try:
        return SamplingParams(
            n=1 if request.n is None else request.n,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logprob_token_ids=request.logprob_token_ids or None,
            skip_special_tokens=request.skip_special_tokens and not keep_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens and not keep_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logit_bias=logit_bias,
            allowed_token_ids=request.allowed_token_ids,
            bad_words=request.bad_words,
            structured_outputs=structured_outputs,
            **values,
        )
    except ValidationError as e:
        raise APIError(e.message, param=e.param) from e


# ---- structured outputs ----


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


async def check_compiles(info: EngineInfo, spec: StructuredOutputsParams, param: str) -> None:
    """A 400 naming the construct when the grammar engine cannot compile `spec` for this model.

    NOTE: on a worker thread (llguidance releases the GIL), so the event loop never waits on a big schema.
    The engine compiles it again in its own process, off its loop: this check is what lets a bad schema get
    its 400 before the response starts."""
    try:
        await asyncio.to_thread(compile_grammar, spec, info.tokenizer, info.vocab_size, sorted(info.eos_token_ids),
                                info.config.structured_outputs_config)
    except ValueError as e:
        raise APIError(str(e), param=param) from e
