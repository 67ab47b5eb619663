"""The llguidance view of a Hugging Face tokenizer (token bytes, EOS ids, vocabulary size), built once.

Building it walks the whole vocabulary (over a second for Qwen's 152k tokens), so it is cached per tokenizer
object (weakly: a dropped tokenizer takes its entries with it), vocabulary size and EOS ids.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance

_cache: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def default_eos_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's own EOS id, when the caller does not know the model's stop tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids to compile_grammar")
    return (int(eos),)


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """An `llguidance.LLTokenizer` for a fast HF tokenizer, with `max(vocab_size, len(tokenizer))` tokens.

    NOTE: the model's vocab_size may exceed the tokenizer's length (Qwen2.5: 151936 vs 151665); the
    padding ids map to no bytes, so llguidance never allows them. A vocab_size below the tokenizer's
    length is clipped by the matcher instead.
    """
    key = (int(vocab_size), tuple(sorted({int(t) for t in eos_token_ids})))
    if not key[1]:
        raise ValueError("eos_token_ids must not be empty")
    with _lock:
        per_tokenizer = _cache.setdefault(tokenizer, {})
        cached = per_tokenizer.get(key)
    if cached is not None:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("structured outputs need a fast (tokenizer.json) tokenizer")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    spec = _without_space_folding(json.loads(backend.to_str()))
    built = llguidance.LLTokenizer(json.dumps(spec), n_vocab=max(key[0], len(tokenizer)), eos_token=list(key[1]))
    with _lock:
        return _cache.setdefault(tokenizer, {}).setdefault(key, built)


_REGEX_SYNTAX = re.compile(r"\\[Az]|[|^$+*?(){}0-9,]")


def _without_space_folding(spec: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json without normalizer steps that strip or merge spaces.

    NOTE: llguidance tokenizes text the grammar forces (e.g. the " " in `[0-9]{2} [0-9]{3}`) to pick the
    tokens it allows. A normalizer that strips leading spaces or merges runs of them (sentencepiece's
    remove_extra_whitespaces, as in the bundled stories260K tokenizer) makes that forced space vanish, and
    llguidance then allows tokens the grammar rejects. Token bytes do not depend on the normalizer.
    """
    normalizer = spec.get("normalizer")
    if not normalizer:
        return spec
    steps = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    kept = [step for step in steps if not _folds_spaces(step)]
    if len(kept) == len(steps):
        return spec
    spec = dict(spec)
    spec["normalizer"] = {"type": "Sequence", "normalizers": kept} if kept else None
    return spec


def _folds_spaces(step: dict[str, Any]) -> bool:
    if step.get("type") != "Replace" or step.get("content") not in ("", " "):
        return False
    pattern = step.get("pattern", {})
    text = pattern.get("Regex", pattern.get("String", ""))
    return bool(text) and not _REGEX_SYNTAX.sub("", text).strip()
