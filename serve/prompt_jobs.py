"""The work `serve.render_pool` runs, inline or in a worker process: each a function of the tokenizer, light to
import (a worker imports this module), its errors plain exceptions (one crosses the pipe pickled, and
Jinja's do not unpickle)."""

from __future__ import annotations

import json
from typing import Any

import jinja2

from jaxllm import tokenizer as tokenization
from jaxllm.validation import out_of_vocab_error


class TemplateError(ValueError):
    """The chat template could not render these messages; the message is the client's."""


class OutOfVocabError(ValueError):
    """Token ids outside the vocabulary; the message names them."""


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *, max_chars: int | None, add_special_tokens: bool,
                **template_options: Any) -> tuple[str, list[int] | None]:
    """The rendered prompt and its token ids; None for the ids when the text is over `max_chars` (it cannot
    fit: not worth tokenizing). `template_options`: `jaxllm.tokenizer.apply_chat_template`'s."""
    try:
        text = tokenization.apply_chat_template(tokenizer, messages, **template_options)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise TemplateError(str(e)) from None
    if max_chars is not None and len(text) > max_chars:
        return text, None
    return text, tokenization.encode_prompt(tokenizer, text, add_special_tokens=add_special_tokens)


def encode_all(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    return [tokenization.encode_prompt(tokenizer, text, add_special_tokens=add_special_tokens) for text in texts]


def tokenize_reply(tokenizer: Any, text: str, *, add_special_tokens: bool, max_model_len: int,
                   with_token_strs: bool) -> bytes:
    """/tokenize's JSON for a text."""
    token_ids = tokenization.encode_prompt(tokenizer, text, add_special_tokens=add_special_tokens)
    return tokens_reply(tokenizer, token_ids, max_model_len=max_model_len, with_token_strs=with_token_strs)


def tokens_reply(tokenizer: Any, token_ids: list[int], *, max_model_len: int, with_token_strs: bool) -> bytes:
    """/tokenize's JSON for token ids (serialized here: a long list costs the event loop too)."""
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if with_token_strs else None
    reply = {"count": len(token_ids), "max_model_len": max_model_len, "tokens": token_ids, "token_strs": token_strs}
    return json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode()


def detokenize(tokenizer: Any, token_ids: list[int], vocab_size: int) -> str:
    """The text of `token_ids`."""
    if (error := out_of_vocab_error(token_ids, vocab_size, "tokens")) is not None:
        raise OutOfVocabError(error.message)
    return tokenizer.decode(token_ids)
