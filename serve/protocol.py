"""Request bodies with vLLM's field names and defaults (pydantic).

Unknown fields are accepted and logged, as vLLM does; a known field of the wrong type is a 400 that
names it (`errors.from_validation_error`). Responses are plain dicts built in `completions` / `chat`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger("jaxllm.serve")

StopParam = str | list[str] | None
_INT64 = 2**63
_known_fields: dict[type, set[str]] = {}


class FieldError(ValueError):
    """A validation error about one request field; `errors.from_validation_error` reports it as `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _log_ignored_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if isinstance(data, dict):
            known = _known_fields.get(cls)
            if known is None:
                known = _known_fields[cls] = set(cls.model_fields)
            ignored = data.keys() - known
            if ignored:
                logger.warning("The following fields were present in the request but ignored: %s", sorted(ignored))
        return result


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIRequest):
    """Fields shared by completions and chat (OpenAI's, then vLLM's extra sampling fields)."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = 1
    seed: Annotated[int, Field(ge=-_INT64, lt=_INT64)] | None = None
    stop: StopParam = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extra sampling params.
    use_beam_search: bool = False
    # NOTE: the beam score divides by num_tokens ** length_penalty, finite within +-16 for any length below 2**63.
    length_penalty: Annotated[float, Field(ge=-16.0, le=16.0)] = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, lt=_INT64)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    # vLLM's extra request params.
    request_id: str | None = None
    cache_salt: Annotated[str, Field(min_length=1)] | None = None
    priority: int = 0
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        # vLLM's: an empty `stream_options: {}` is no option, so it needs no stream.
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise FieldError("Stream options can only be defined when `stream=True`.", "stream_options")
        return self

    @model_validator(mode="after")
    def _check_prompt_logprobs(self) -> SamplingFields:
        if self.prompt_logprobs is not None:
            if self.stream and (self.prompt_logprobs > 0 or self.prompt_logprobs == -1):
                raise FieldError("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
            _check_logprobs_count(self.prompt_logprobs, "prompt_logprobs")
        return self


def _check_logprobs_count(value: int | None, name: str) -> None:
    """vLLM's rule for a logprobs count: -1 (the whole vocabulary, where --max-logprobs allows it) or more."""
    if value is not None and value < -1:
        raise FieldError(f"`{name}` must be a positive value or -1.", name)


class CompletionRequest(SamplingFields):
    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_max_tokens_is_default(cls, value: Any) -> Any:
        return 16 if value is None else value  # vLLM: an explicit null means the default

    @model_validator(mode="after")
    def _check_logprobs(self) -> CompletionRequest:
        if self.logprob_token_ids and self.logprobs is None:
            raise FieldError("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
        _check_logprobs_count(self.logprobs, "logprobs")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    logprobs: bool | None = False
    top_logprobs: int | None = 0  # null: 0, as vLLM reads it
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    # vLLM's values; a harmony model (gpt-oss) takes low, medium or high only (serve.harmony_chat).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or []):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict) or not isinstance(
                    function.get("name"), str):
                raise ValueError(f"tool {i} must be {{'type': 'function', 'function': {{'name': ..., "
                                 "'parameters': {...}}}")
            if not isinstance(function.get("parameters") or {}, dict):
                raise ValueError(f"tool {i}: `function.parameters` must be a JSON schema object")
        return tools

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not messages:
            raise ValueError("must hold at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} needs a string `role`")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise ValueError(f"message {i}: `content` must be a string, a list of parts, or null")
        return messages

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.logprob_token_ids and not self.logprobs:
            raise FieldError("when using `logprob_token_ids`, `logprobs` must be set to true.", "logprob_token_ids")
        _check_logprobs_count(self.top_logprobs, "top_logprobs")
        if self.top_logprobs is not None and (self.top_logprobs == -1 or self.top_logprobs > 0) and not self.logprobs:
            raise FieldError("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        return self

    @model_validator(mode="after")
    def _check_generation_prompt(self) -> ChatCompletionRequest:
        # NOTE: vLLM's check: the default add_generation_prompt=True also conflicts, so clients that
        # prefill an assistant turn send add_generation_prompt=false with continue_final_message=true.
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                "continue_final_message",
            )
        return self


class TokenizeCompletionRequest(OpenAIRequest):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIRequest):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]
