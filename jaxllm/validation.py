"""Request validation, once, with one set of messages: sampling ranges, then the request against the model.

    validate_sampling(params)                       when SamplingParams is built (its own ranges)
    validate_request(prompt_token_ids, params, ...)  before a request reaches the engine: the prompt, the
                                                     output budget against the context and the KV pool,
                                                     token ids against the vocabulary, logprobs limits
                                                     (`validate_logprobs`: --max-logprobs)
    tokenize_bad_words(bad_words, tokenizer, ...)    ... and bad_words as the sampler bans them (token ids)

Both raise `ValidationError`, a ValueError that carries the offending request field as `param` (vLLM's
`VLLMValidationError`); the server answers it with a 400 naming that field, the offline `LLM` raises it.
The server calls `validate_request` before it answers, so a bad streamed request gets its 400 before any
200; the engine trusts what it is given.

Only the standard library here: the engine, the server and the offline API all import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxllm.config import EngineLimits
    from jaxllm.sampling_params import SamplingParams

# Token ids a request may ask the logprobs of (`SamplingParams.logprob_token_ids`), as vLLM's MAX_LOGPROB_TOKEN_IDS.
MAX_LOGPROB_TOKEN_IDS = 128
# The token sequences a request's bad_words may tokenize to, and their tokens together: the defaults of vLLM's
# $VLLM_MAX_NUM_BAD_WORDS and $VLLM_MAX_BAD_WORDS_TOTAL_TOKENS.
MAX_NUM_BAD_WORDS = 128
MAX_BAD_WORDS_TOTAL_TOKENS = 1024


class ValidationError(ValueError):
    """A request the engine cannot serve; `param` names the request field at fault (None: the request)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _check(ok: bool, params: SamplingParams, name: str, msg: str) -> None:
    if not ok:
        raise ValidationError(f"{name} {msg}, got {getattr(params, name)!r}.", name)


def validate_sampling(p: SamplingParams) -> None:
    """The ranges of each sampling field, as vLLM's SamplingParams checks them."""
    _check(isinstance(p.n, int) and p.n >= 1, p, "n", "must be at least 1")
    _check(-2.0 <= p.presence_penalty <= 2.0, p, "presence_penalty", "must be in [-2, 2]")
    _check(-2.0 <= p.frequency_penalty <= 2.0, p, "frequency_penalty", "must be in [-2, 2]")
    _check(0.0 < p.repetition_penalty <= 2.0, p, "repetition_penalty", "must be in (0, 2]")
    _check(math.isfinite(p.temperature), p, "temperature", "must be a finite number")
    _check(p.temperature >= 0.0, p, "temperature", "must be non-negative")
    _check(p.temperature <= 2.0, p, "temperature", "must be in [0, 2]")
    _check(0.0 < p.top_p <= 1.0, p, "top_p", "must be in (0, 1]")
    _check(isinstance(p.top_k, int) and p.top_k >= 0, p, "top_k", "must be 0 or -1 (disable), or at least 1")
    _check(0.0 <= p.min_p <= 1.0, p, "min_p", "must be in [0, 1]")
    _check(p.max_tokens is None or (isinstance(p.max_tokens, int) and p.max_tokens >= 1), p, "max_tokens",
           "must be at least 1")
    _check(isinstance(p.min_tokens, int) and p.min_tokens >= 0, p, "min_tokens", "must be non-negative")
    if p.max_tokens is not None:
        _check(p.min_tokens <= p.max_tokens, p, "min_tokens", "must be less than or equal to max_tokens")
    _check(p.logprobs is None or (isinstance(p.logprobs, int) and p.logprobs >= -1), p, "logprobs",
           "must be non-negative or -1")
    _check(p.prompt_logprobs is None or (isinstance(p.prompt_logprobs, int) and p.prompt_logprobs >= -1), p,
           "prompt_logprobs", "must be non-negative or -1")
    _check(p.logprob_token_ids is None or all(isinstance(t, int) for t in p.logprob_token_ids), p,
           "logprob_token_ids", "must be integers")
    _check(p.seed is None or isinstance(p.seed, int), p, "seed", "must be an integer")
    _check(all(isinstance(s, str) and s for s in p.stop), p, "stop", "must be non-empty strings")
    _check(all(isinstance(t, int) for t in p.stop_token_ids), p, "stop_token_ids", "must be integers")
    _check(p.allowed_token_ids is None or len(p.allowed_token_ids) > 0, p, "allowed_token_ids", "must not be empty")
    if p.logit_bias:
        _check(all(-100.0 <= b <= 100.0 for b in p.logit_bias.values()), p, "logit_bias",
               "values must be in [-100, 100]")


def out_of_vocab_error(token_ids: Sequence[int], vocab_size: int, param: str) -> ValidationError | None:
    """The error for ids outside [0, vocab_size), or None when all are inside."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if not bad:
        return None
    return ValidationError(f"Token ids {bad[:5]} are out of vocabulary (size {vocab_size}).", param)


def tokenize_bad_words(bad_words: Sequence[str], tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """vLLM 0.34's `update_from_tokenizer`: the token ids of each word (leading whitespace stripped), then those of
    the word after a space where that starts with another token and is as long (a word both at the start of the
    text and inside it). `tokenizer`: a transformers tokenizer.

    NOTE: vLLM's worker refuses more than MAX_BAD_WORDS_TOTAL_TOKENS tokens when the request reaches it; here it
    is a 400 like the rest."""
    sequences: list[list[int]] = []
    for word in bad_words:
        for prefix in ("", " "):
            token_ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
            if not token_ids:
                if not prefix:
                    raise ValidationError("bad_words entries must tokenize to at least one token.", "bad_words")
                continue
            if prefix and (token_ids[0] == sequences[-1][0] or len(token_ids) != len(sequences[-1])):
                continue
            sequences.append(token_ids)
            if len(sequences) > MAX_NUM_BAD_WORDS:
                raise ValidationError(f"Too many bad words after tokenization: {len(sequences)}. The max number is "
                                      f"{MAX_NUM_BAD_WORDS}.", "bad_words")
    if invalid := [t for token_ids in sequences for t in token_ids if not 0 <= t < vocab_size]:
        raise ValidationError(f"The model vocabulary size is {vocab_size}, but the following tokens were specified "
                              f"as bad: {invalid}. All token id values should be integers satisfying: 0 <= token_id "
                              f"<= {vocab_size - 1}.", "bad_words")
    if (total := sum(map(len, sequences))) > MAX_BAD_WORDS_TOTAL_TOKENS:
        raise ValidationError(f"Too many total bad word tokens: {total}. The max is {MAX_BAD_WORDS_TOTAL_TOKENS}.",
                              "bad_words")
    return sequences


def context_length_error(max_model_len: int, num_prompt: int, max_tokens: int | None) -> ValidationError:
    if max_tokens is None:
        return ValidationError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt} input tokens. Please reduce the length of the input messages.", "input_tokens")
    return ValidationError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {max_tokens} "
        f"output tokens and your prompt contains at least {num_prompt} input tokens, for a total of at least "
        f"{num_prompt + max_tokens} tokens. Please reduce the length of the input prompt or the number of "
        "requested output tokens.", "input_tokens" if num_prompt >= max_model_len else "max_tokens")


def validate_logprobs(params: SamplingParams, max_logprobs: int, vocab_size: int) -> None:
    """vLLM 0.34's logprobs rules: `logprobs` and `prompt_logprobs` (-1: the whole vocabulary) at most
    `max_logprobs` (-1: no limit); `logprob_token_ids` at most MAX_LOGPROB_TOKEN_IDS ids of the vocabulary,
    as many as `logprobs` when both are set."""
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    _check_logprobs_limit(params.logprobs, "sample", "logprobs", limit, vocab_size)
    if params.logprob_token_ids is not None:
        _validate_logprob_token_ids(params.logprob_token_ids, params.logprobs, vocab_size)
    _check_logprobs_limit(params.prompt_logprobs, "prompt", "prompt_logprobs", limit, vocab_size)


def _check_logprobs_limit(value: int | None, kind: str, name: str, limit: int, vocab_size: int) -> None:
    wanted = vocab_size if value == -1 else value
    if wanted and wanted > limit:
        raise ValidationError(f"Requested {kind} logprobs of {wanted}, which is greater than max allowed: {limit}. "
                              f"Set max_logprobs (--max-logprobs) to at least {wanted}.", name)


def _validate_logprob_token_ids(token_ids: list[int], logprobs: int | None, vocab_size: int) -> None:
    count = len(token_ids)
    if count > MAX_LOGPROB_TOKEN_IDS:
        raise ValidationError(f"Requested logprob_token_ids of length {count}, which is greater than max allowed: "
                              f"{MAX_LOGPROB_TOKEN_IDS}", "logprob_token_ids")
    if invalid := [t for t in token_ids if not 0 <= t < vocab_size]:
        raise ValidationError(f"token_id(s) {invalid} in logprob_token_ids contain out-of-vocab token ids. "
                              f"Vocabulary size: {vocab_size}", "logprob_token_ids")
    if logprobs is not None and logprobs != count:
        raise ValidationError(f"When both logprobs and logprob_token_ids are set, logprobs must equal "
                              f"len(logprob_token_ids). Got logprobs={logprobs}, len(logprob_token_ids)={count}.",
                              "logprob_token_ids")


def validate_request(prompt_token_ids: Sequence[int], params: SamplingParams, limits: EngineLimits,
                     vocab_size: int, *, max_logprobs: int, structured_outputs: bool = True,
                     default_max_tokens: int | None = None) -> int:
    """Raise `ValidationError` for a request this engine cannot serve; return its output budget:
    `params.max_tokens`, or the rest of the context when that is None, capped by `default_max_tokens` (the
    server's: the model's generation config, as vLLM's get_max_tokens), which the context check ignores.

    `max_logprobs`: the engine's limit on logprobs per position (--max-logprobs; -1: the whole vocabulary).

    `structured_outputs`: whether the engine has a grammar backend. Whether a grammar compiles is checked
    apart (`jaxllm.structured.compile_grammar`): the engine compiles it off its loop."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValidationError("The decoder prompt cannot be empty", "prompt")
    if (error := out_of_vocab_error(prompt_token_ids, vocab_size, "prompt")) is not None:
        raise error
    for name in ("stop_token_ids", "allowed_token_ids"):
        if (error := out_of_vocab_error(getattr(params, name) or [], vocab_size, name)) is not None:
            raise error
    if (error := out_of_vocab_error(list(params.logit_bias or {}), vocab_size, "logit_bias")) is not None:
        raise error
    validate_logprobs(params, max_logprobs, vocab_size)
    max_model_len = limits.max_model_len
    max_tokens = params.max_tokens
    if max_tokens is None:
        if num_prompt >= max_model_len:
            raise context_length_error(max_model_len, num_prompt, None)
        max_tokens = max_model_len - num_prompt
    elif num_prompt + max_tokens > max_model_len:
        raise context_length_error(max_model_len, num_prompt, max_tokens)
    if default_max_tokens is not None:
        max_tokens = min(max_tokens, default_max_tokens)
    if params.min_tokens > max_tokens:
        raise ValidationError(f"min_tokens must be less than or equal to max_tokens ({max_tokens}), got "
                              f"{params.min_tokens}.", "min_tokens")
    pages_needed = -(-(num_prompt + max_tokens - 1) // limits.block_size)  # the last token's KV is never computed
    if pages_needed > limits.num_pages:
        raise ValidationError(
            f"The request needs {pages_needed} KV pages of {limits.block_size} tokens ({num_prompt} prompt + "
            f"{max_tokens} output tokens), more than the {limits.num_pages} pages of the KV cache.", "max_tokens")
    if params.structured_outputs is not None and not structured_outputs:
        raise ValidationError("structured_outputs is not supported by this engine (no grammar backend)",
                              "structured_outputs")
    return max_tokens
