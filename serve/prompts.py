"""Request -> prompt token ids, and the context-length checks with vLLM's wording."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

from jaxllm import tokenizer as tokenization
from serve.errors import APIError


@dataclass
class EnginePrompt:
    token_ids: list[int]
    text: str | None  # None when the client sent token ids


def completion_prompts(tokenizer: Any, prompt: Any, *, add_special_tokens: bool, vocab_size: int) -> list[EnginePrompt]:
    """A completions `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""
    if prompt is None or prompt == "" or prompt == []:
        raise APIError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenization.encode_prompt(tokenizer, item, add_special_tokens=add_special_tokens)
            out.append(EnginePrompt(ids, item))
        else:
            if not item:
                raise APIError("A token-id prompt must not be empty.", param="prompt")
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise APIError(f"Token ids {bad[:5]} are out of vocabulary (size {vocab_size}).", param="prompt")
            out.append(EnginePrompt(list(item), None))
    return out


def chat_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    tools: list[dict[str, Any]] | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> EnginePrompt:
    """Render with the model's (or --chat-template's) template, then tokenize without special tokens
    (the template writes BOS), as vLLM does. Fed-back tool calls' arguments are parsed first."""
    try:
        text = tokenization.apply_chat_template(
            tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise APIError(str(e), param="messages") from e
    return EnginePrompt(tokenization.encode_prompt(tokenizer, text, add_special_tokens=add_special_tokens), text)


def context_error(max_model_len: int, output_tokens: int, prompt_tokens: int, param: str) -> APIError:
    return APIError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{output_tokens} output tokens and your prompt contains at least {prompt_tokens} input tokens, "
        f"for a total of at least {prompt_tokens + output_tokens} tokens. Please reduce the length of the "
        "input prompt or the number of requested output tokens.",
        param=param,
    )


def resolve_max_tokens(
    max_model_len: int, prompt_tokens: int, requested: int | None, param: str, model_default: int | None
) -> int:
    """The output budget of one prompt (vLLM's `get_max_tokens`): the request's value, else the rest of
    the context; never above the model's generation-config default or the context. A prompt with no
    room for one output token, or a request that does not fit, is vLLM's 400."""
    if prompt_tokens + max(requested or 1, 1) > max_model_len:
        too_long_prompt = prompt_tokens >= max_model_len
        raise context_error(max_model_len, requested or 1, prompt_tokens, "input_tokens" if too_long_prompt else param)
    candidates = [max_model_len - prompt_tokens]
    if requested is not None:
        candidates.append(requested)
    if model_default is not None:
        candidates.append(model_default)
    return min(candidates)
