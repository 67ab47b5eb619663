"""`compile_grammar`: vLLM's `structured_outputs` spec -> a validated llguidance grammar, cached.

A spec is one of `json` (a JSON schema, dict or string), `json_object`, `regex`, `choice` (list of
strings), `grammar` (Lark or GBNF/EBNF text, as vLLM's guidance backend accepts) or `structural_tag`
(vLLM's JSON: `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`). Anything llguidance
cannot compile raises `ValueError` with its message, which names the construct
('Unimplemented keys: ["not"]', 'Unknown format: ...', a regex error with its position).

The engine's `StructuredOutputsConfig` applies to JSON schemas as vLLM's guidance backend applies it:
`disable_any_whitespace` makes the JSON compact, `disable_additional_properties` closes every object schema
that declares properties. A schema's own `x-guidance` options (forced tool calls set them) come last.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

from jaxllm.config import StructuredOutputsConfig
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.structured.matcher import GrammarMatcher
from jaxllm.structured.schema_rules import close_objects
from jaxllm.structured.tokenizer_info import default_eos_token_ids, ll_tokenizer

# NOTE: whitespace between JSON tokens is limited to nothing, one space, or a newline plus up to 32 spaces or
# tabs of indentation: enough for inline (`{"a": 1}`) and pretty-printed JSON. vLLM's guidance default allows
# any run of whitespace, and with random or weak weights such runs eat the max_tokens budget and leave the
# JSON unfinished.
JSON_WHITESPACE_PATTERN = r"(?:\n[\x20\x09]{0,32}|\x20)?"
_FLEXIBLE = {"whitespace_pattern": JSON_WHITESPACE_PATTERN}
_COMPACT = {"whitespace_flexible": False}
_CACHE_SIZE = 256


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A grammar checked against one tokenizer; `new_matcher()` gives each request its own state."""

    kind: str  # "json" | "json_object" | "regex" | "choice" | "grammar" | "structural_tag"
    grammar: str  # llguidance's serialized grammar
    vocab_size: int  # the model's vocabulary size (bitmask length is ceil(vocab_size / 32) words)
    eos_token_ids: tuple[int, ...]  # tokens that end a finished grammar
    _prototype: llguidance.LLMatcher  # in its initial state; copied, never advanced
    _tokenizer: llguidance.LLTokenizer

    def new_matcher(self) -> GrammarMatcher:
        """A fresh matcher in the grammar's start state (a copy, not a recompile)."""
        return GrammarMatcher(self._prototype.deep_copy(), self.vocab_size, self._tokenizer.vocab_size,
                              self.eos_token_ids)


def spec_kind_and_value(spec: StructuredOutputsParams) -> tuple[str, Any]:
    """The one field a spec sets, and its value."""
    for kind in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
        value = getattr(spec, kind)
        if value not in (None, False):
            return kind, value
    raise ValueError("structured_outputs must set one of json, regex, choice, grammar, json_object")


def _json_schema(value: dict[str, Any] | str, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON schema object, got {type(value).__name__}")
    return value


def _with_options(schema: dict[str, Any], options: StructuredOutputsConfig) -> dict[str, Any]:
    """The schema as the engine's options read it, its own `x-guidance` options over theirs."""
    if options.disable_additional_properties:
        schema = close_objects(schema, every_object=False)
    defaults = _COMPACT if options.disable_any_whitespace else _FLEXIBLE
    own = schema.get("x-guidance", {})
    return {**schema, "x-guidance": {**defaults, **own} if isinstance(own, dict) else own}  # llguidance names a bad one


def _structural_tag_grammar(value: str | dict[str, Any], options: StructuredOutputsConfig) -> str:
    tag = _json_schema(value, "structural_tag")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list):
        raise ValueError("structural_tag needs non-empty 'structures' and a 'triggers' list")
    if not all(isinstance(t, str) for t in triggers):
        raise ValueError("structural_tag: 'triggers' must be a list of strings")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not all(isinstance(s.get(key, ""), str) for key in ("begin", "end")):
            raise ValueError(f"structural_tag: structures[{i}] must be an object with string 'begin' and 'end'")
        begin = s.get("begin", "")
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structural_tag: begin {begin!r} starts with none of the triggers {triggers}")
        grammar = _with_options(_json_schema(s.get("schema", {}), "structural_tag schema"), options)
        tags.append(llguidance.StructTag(trigger=trigger, begin=begin, grammar=grammar, end=s.get("end", "")))
    return llguidance.StructTag.to_grammar(tags)


def _to_llguidance(kind: str, value: Any, options: StructuredOutputsConfig) -> str:
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(_with_options(_json_schema(value, "json"), options))
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_with_options({"type": "object"}, options))
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError("regex must be a string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("choice must be a non-empty list of strings")
        return llguidance.grammar_from("choice", value)
    if kind == "grammar":
        if not isinstance(value, str):
            raise ValueError("grammar must be a string")
        return llguidance.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
    if kind == "structural_tag":
        return _structural_tag_grammar(value, options)
    raise ValueError(f"unknown structured output kind {kind!r}")


def _cache_key(kind: str, value: Any, options: StructuredOutputsConfig) -> str:
    return f"{kind}:{options.disable_any_whitespace:d}{options.disable_additional_properties:d}:" + json.dumps(
        value, sort_keys=True, ensure_ascii=False)


class _GrammarCache:
    """LRU of compiled grammars keyed by (tokenizer, vocab, EOS ids, spec)."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._entries: OrderedDict[tuple[int, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> CompiledGrammar | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: tuple[int, str], value: CompiledGrammar) -> CompiledGrammar:
        with self._lock:
            # NOTE: the key holds id() of the LLTokenizer; the entry keeps that object alive, so the id
            # cannot be reused by another tokenizer while the entry exists.
            value = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _GrammarCache(_CACHE_SIZE)


def compile_grammar(
    spec: StructuredOutputsParams,
    tokenizer: Any,
    vocab_size: int,
    eos_token_ids: Sequence[int] | None = None,
    options: StructuredOutputsConfig | None = None,
) -> CompiledGrammar:
    """Compile `spec` for a fast HF `tokenizer` and a model with `vocab_size` logits.

    `eos_token_ids` are the ids that may end the output once the grammar is complete (pass the model's
    stop tokens, e.g. `SamplingParams.all_stop_token_ids`; default: the tokenizer's EOS). `options` is the
    engine's --structured-outputs-config (default: vLLM's defaults). Results are
    cached. Raises `ValueError` naming the problem for an invalid or unsupported spec. Compiling a large
    schema can take tens of milliseconds and releases the GIL: call it from a worker thread in a server.
    """
    kind, value = spec_kind_and_value(spec)
    options = options or StructuredOutputsConfig()
    eos = tuple(sorted({int(t) for t in (eos_token_ids or default_eos_token_ids(tokenizer))}))
    tokenizer_view = ll_tokenizer(tokenizer, vocab_size, eos)
    key = (id(tokenizer_view), _cache_key(kind, value, options))
    hit = _cache.get(key)
    if hit is not None:
        return hit
    grammar = _to_llguidance(kind, value, options)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer_view)
    if is_error:
        raise ValueError(f"unsupported {_field_name(kind)}: {messages[0]}")
    prototype = llguidance.LLMatcher(tokenizer_view, grammar, log_level=0)
    if prototype.is_error():
        raise ValueError(f"unsupported {_field_name(kind)}: {prototype.get_error()}")
    compiled = CompiledGrammar(kind, grammar, int(vocab_size), eos, prototype, tokenizer_view)
    return _cache.put(key, compiled)


def _field_name(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON object grammar"}.get(kind, kind)


def clear_cache() -> None:
    """Drop every cached compiled grammar (tests, or a server swapping models)."""
    _cache.clear()


def make_grammar_compiler(
    tokenizer: Any, vocab_size: int, options: StructuredOutputsConfig | None = None
) -> Callable[[SamplingParams], CompiledGrammar]:
    """The engine's `grammar_compiler`: a request's SamplingParams -> its compiled grammar (each of the
    request's sequences takes `new_matcher()` of it), with the engine's --structured-outputs-config.

    EOS is the request's `all_stop_token_ids` (the model's stop tokens, filled in by the engine), else the
    tokenizer's. The engine core calls it on a worker thread, off its loop."""

    def compile_for(params: SamplingParams) -> CompiledGrammar:
        if params.structured_outputs is None:
            raise ValueError("the request has no structured_outputs")
        eos = sorted(params.all_stop_token_ids) or None
        return compile_grammar(params.structured_outputs, tokenizer, vocab_size, eos, options)

    return compile_for
