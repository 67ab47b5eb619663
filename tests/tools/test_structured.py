"""Structured outputs: a random-token sampler (uniform among the tokens the bitmask allows) over real
tokenizers must always produce output that satisfies the spec; the bitmask layout, vocab padding and
the matcher seam; unsupported specs are ValueErrors that name the construct."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxllm.config import StructuredOutputsConfig
from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.structured import (
    allowed_token_ids,
    apply_bitmask_numpy,
    bitmask_words,
    compile_grammar,
    structured_outputs_from_request,
    tool_choice_constraint,
)
from jaxllm.structured.schema_rules import bound_open_values, close_objects
from serve.tool_parsers import ConstrainedToolParser
from tests.fixtures import fixture_tokenizer

STORIES = "jaxllm/data/stories260K"
QWEN_MODEL_VOCAB = 151936  # Qwen2.5 configs pad the embedding past the tokenizer's 151665 tokens
RUNS = 20
MAX_TOKENS = 200


@dataclass
class Model:
    tokenizer: Any
    vocab_size: int
    eos: tuple[int, ...]
    closing: np.ndarray  # [vocab_size] bool: tokens made only of '"', '}' and ']'
    num_tokens: int  # the tokenizer's length (len() is slow on HF tokenizers)

    def compile(self, spec: StructuredOutputsParams):
        return compile_grammar(spec, self.tokenizer, self.vocab_size, self.eos)


def _closing_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    closing = np.zeros(vocab_size, bool)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        text = chr(int(byte.group(1), 16)) if byte else piece
        closing[i] = bool(text) and set(text) <= set('"}]')
    return closing


@pytest.fixture(scope="module")
def qwen() -> Model:
    tokenizer = AutoTokenizer.from_pretrained(str(fixture_tokenizer("qwen2.5")))
    eos = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return Model(tokenizer, QWEN_MODEL_VOCAB, eos, _closing_tokens(tokenizer, QWEN_MODEL_VOCAB), len(tokenizer))


@pytest.fixture(scope="module")
def stories() -> Model:
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    size = len(tokenizer)
    return Model(tokenizer, size, (tokenizer.eos_token_id,), _closing_tokens(tokenizer, size), size)


@pytest.fixture(params=["qwen", "stories"])
def model(request: pytest.FixtureRequest) -> Model:
    return request.getfixturevalue(request.param)


def sample(model: Model, compiled, seed: int, wrap_up_after: int | None = None) -> str:
    """Uniform random tokens among those allowed, until EOS or MAX_TOKENS; the decoded text.

    Checks on the way that every mask allows only real tokens and that every sampled token is accepted.
    `wrap_up_after`: from then on, prefer EOS, then tokens made of closing characters, when allowed
    (for grammars whose strings are unbounded, which a uniform sampler would otherwise never finish).
    """
    rng = np.random.default_rng(seed)
    matcher = compiled.new_matcher()
    row = np.zeros(bitmask_words(model.vocab_size), np.int32)
    tokens: list[int] = []
    for step in range(MAX_TOKENS):
        matcher.fill_bitmask(row)
        allowed = allowed_token_ids(row, model.vocab_size)
        assert len(allowed) and allowed[-1] < model.num_tokens  # never padding ids
        if wrap_up_after is not None and step >= wrap_up_after:
            eos = [t for t in allowed if t in model.eos]
            closers = allowed[model.closing[allowed]]
            allowed = np.array(eos) if eos else closers if len(closers) else allowed
        token = int(allowed[rng.integers(len(allowed))])
        assert matcher.accept_token(token), matcher.error
        if token in model.eos:
            assert matcher.is_terminated()
            return model.tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"no EOS within {MAX_TOKENS} tokens: {model.tokenizer.decode(tokens)!r}")


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "status": {"enum": ["active", "inactive", None]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "contact": {"anyOf": [{"$ref": "#/$defs/phone"}, {"type": "boolean"}]},
        "nick": {"type": ["string", "null"], "maxLength": 5},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {"phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3}$"}},
}


def test_json_schema_outputs_validate_20_of_20(model: Model) -> None:
    compiled = model.compile(StructuredOutputsParams(json=PERSON_SCHEMA))
    for seed in range(RUNS):
        jsonschema.validate(json.loads(sample(model, compiled, seed)), PERSON_SCHEMA)


def test_json_schema_given_as_a_string_is_the_same_grammar(qwen: Model) -> None:
    as_dict = qwen.compile(StructuredOutputsParams(json=PERSON_SCHEMA))
    as_text = qwen.compile(StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA)))
    assert as_dict.grammar == as_text.grammar


def test_json_object_outputs_parse_to_objects(model: Model) -> None:
    compiled = model.compile(StructuredOutputsParams(json_object=True))
    for seed in range(RUNS):
        assert isinstance(json.loads(sample(model, compiled, seed, wrap_up_after=60)), dict)


def test_choice_yields_one_of_the_choices(model: Model) -> None:
    choices = ["yes", "yes, sure", "no", "peut-être", "🙂 maybe"]
    compiled = model.compile(StructuredOutputsParams(choice=choices))
    seen = {sample(model, compiled, seed) for seed in range(RUNS)}
    assert seen <= set(choices) and len(seen) > 1


@pytest.mark.parametrize("pattern", [r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
                                     r"(true|false|[A-F0-9]{4}(-[A-F0-9]{4}){0,3})"])
def test_regex_outputs_fullmatch(model: Model, pattern: str) -> None:
    compiled = model.compile(StructuredOutputsParams(regex=pattern))
    for seed in range(RUNS):
        text = sample(model, compiled, seed)
        assert re.fullmatch(pattern, text), text


SQL = re.compile(r"SELECT (id|name|age)(, (id|name|age))* FROM (users|orders)( LIMIT [1-9])?")


@pytest.mark.parametrize("grammar", [
    # Lark
    'start: "SELECT " col (", " col)* " FROM " table limit?\n'
    'col: "id" | "name" | "age"\ntable: "users" | "orders"\nlimit: " LIMIT " /[1-9]/',
    # GBNF
    'root ::= "SELECT " col (", " col)* " FROM " table limit?\n'
    'col ::= "id" | "name" | "age"\ntable ::= "users" | "orders"\nlimit ::= " LIMIT " [1-9]',
], ids=["lark", "gbnf"])
def test_grammar_outputs_are_sentences_of_the_grammar(model: Model, grammar: str) -> None:
    compiled = model.compile(StructuredOutputsParams(grammar=grammar))
    for seed in range(RUNS):
        text = sample(model, compiled, seed)
        assert SQL.fullmatch(text), text


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"$ref": "#/$defs/tz"}}, "required": ["tz"],
        "additionalProperties": False, "$defs": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: an empty object
]
_PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
               for t in TOOLS}


@pytest.mark.parametrize("tool_choice", ["required", "get_weather", "get_time", "ping"])
def test_forced_tool_choice_always_yields_calls_whose_arguments_validate(model: Model, tool_choice: str) -> None:
    choice = tool_choice if tool_choice == "required" else {"type": "function", "function": {"name": tool_choice}}
    # One call per output: with parallel calls allowed a uniform sampler keeps adding calls past 200 tokens.
    constraint = tool_choice_constraint(TOOLS, choice, parallel_tool_calls=False)
    compiled = model.compile(constraint.structured_outputs)
    parser = ConstrainedToolParser(constraint.function_name)
    for seed in range(RUNS):
        result = parser.extract_tool_calls(sample(model, compiled, seed), {})
        assert result.tools_called and len(result.tool_calls) == 1
        call = result.tool_calls[0]["function"]
        if tool_choice != "required":
            assert call["name"] == tool_choice
        jsonschema.validate(json.loads(call["arguments"]), _PARAMETERS[call["name"]])


def test_required_tool_choice_allows_several_calls(qwen: Model) -> None:
    compiled = qwen.compile(tool_choice_constraint(TOOLS, "required").structured_outputs)
    matcher = compiled.new_matcher()
    text = '[{"name":"ping","parameters":{}},{"name":"get_time","parameters":{"tz":"UTC"}}]'  # compact: see below
    assert matcher.accept_tokens(qwen.tokenizer.encode(text)) and matcher.is_accepting()
    capped = qwen.compile(tool_choice_constraint(TOOLS, "required", parallel_tool_calls=False).structured_outputs)
    assert not capped.new_matcher().accept_tokens(qwen.tokenizer.encode(text))


def test_tool_choice_without_constraint_or_with_an_unknown_tool() -> None:
    assert tool_choice_constraint(TOOLS, "auto") is None and tool_choice_constraint(TOOLS, "none") is None
    with pytest.raises(ValueError, match="Tool 'nope' has not been passed in `tools`"):
        tool_choice_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="`tools` must be set"):
        tool_choice_constraint(None, "required")


@pytest.mark.parametrize(("spec", "construct"), [
    ({"json": {"not": {"type": "string"}}}, '"not"'),
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"if": {"type": "string"}, "then": {"minLength": 2}}}, '"if"'),
    ({"json": {"type": "object", "propertyNames": {"pattern": "^a"}}}, "propertyNames"),
    ({"json": {"type": "string", "format": "shoe-size"}}, "shoe-size"),
    ({"json": {"type": "strnig"}}, "strnig"),
    ({"json": {"$ref": "https://example.com/schema.json"}}, "example.com"),
    ({"json": '{"type": "object",'}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON schema object"),
    ({"regex": "(?=look)ahead"}, "look-around"),
    ({"regex": "unclosed(group"}, "unclosed group"),
    ({"choice": []}, "non-empty list"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_unsupported_specs_raise_value_errors_naming_the_construct(qwen: Model, spec: dict, construct: str) -> None:
    with pytest.raises(ValueError, match=re.escape(construct)):
        qwen.compile(StructuredOutputsParams(**spec))


def test_compiled_grammars_are_cached_per_spec_and_tokenizer(qwen: Model, stories: Model) -> None:
    spec = StructuredOutputsParams(regex="[a-z]+")
    first = qwen.compile(spec)
    assert qwen.compile(StructuredOutputsParams(regex="[a-z]+")) is first
    assert qwen.compile(StructuredOutputsParams(regex="[a-z]*")) is not first
    on_stories = stories.compile(spec)
    assert on_stories is not first
    assert compile_grammar(spec, stories.tokenizer, stories.vocab_size + 64, stories.eos) is not on_stories
    assert compile_grammar(spec, stories.tokenizer, stories.vocab_size, (0,)) is not on_stories


def test_matcher_seam_accept_terminate_reset(qwen: Model) -> None:
    compiled = qwen.compile(StructuredOutputsParams(choice=["yes", "no"]))
    matcher = compiled.new_matcher()
    start, row = np.zeros((2, bitmask_words(qwen.vocab_size)), np.int32)
    matcher.fill_bitmask(start)
    assert {qwen.tokenizer.decode([t]) for t in allowed_token_ids(start, qwen.vocab_size)} >= {"yes", "no"}
    assert matcher.accept_tokens(qwen.tokenizer.encode("yes"))
    assert matcher.is_terminated() and matcher.is_accepting()
    matcher.fill_bitmask(row)
    assert set(allowed_token_ids(row, qwen.vocab_size).tolist()) == set(qwen.eos)  # EOS only
    assert matcher.accept_token(qwen.eos[0]) and not matcher.accept_token(qwen.eos[0])  # nothing after EOS
    matcher.reset()
    assert not matcher.is_terminated()
    matcher.fill_bitmask(row)
    np.testing.assert_array_equal(row, start)
    # A forbidden token is refused and leaves only EOS allowed.
    assert not matcher.accept_token(qwen.tokenizer.encode("maybe")[0])
    assert matcher.is_terminated() and matcher.error
    assert not matcher.accept_token(qwen.vocab_size - 1)  # a padding id is never allowed


def test_model_vocab_smaller_than_the_tokenizer_cuts_the_mask(stories: Model) -> None:
    vocab_size = 300  # the tokenizer has 512
    spec = StructuredOutputsParams(regex="[a-z ]{1,20}")
    full, cut = np.zeros((2, bitmask_words(512)), np.int32)
    stories.compile(spec).new_matcher().fill_bitmask(full)
    row = cut[: bitmask_words(vocab_size)]
    compile_grammar(spec, stories.tokenizer, vocab_size, stories.eos).new_matcher().fill_bitmask(row)
    allowed_full = allowed_token_ids(full, 512)
    assert allowed_full.max() >= vocab_size
    np.testing.assert_array_equal(allowed_token_ids(row, row.size * 32), allowed_full[allowed_full < vocab_size])
    with pytest.raises(ValueError, match="contiguous int32"):
        stories.compile(spec).new_matcher().fill_bitmask(full[:-1])


def test_apply_bitmask_numpy_against_a_per_token_loop() -> None:
    rng = np.random.default_rng(0)
    vocab_size, rows = 70, 3  # 3 words, the last one partly padding
    logits = rng.standard_normal((rows, vocab_size)).astype(np.float32)
    bitmask = rng.integers(-(2**31), 2**31, size=(rows, bitmask_words(vocab_size)), dtype=np.int64).astype(np.int32)
    bitmask[2] = -1  # all allowed
    masked = apply_bitmask_numpy(logits, bitmask)
    for r in range(rows):
        for t in range(vocab_size):
            allowed = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert masked[r, t] == (logits[r, t] if allowed else -np.inf)
    np.testing.assert_array_equal(masked[2], logits[2])
    assert masked.dtype == np.float32 and not np.shares_memory(masked, logits)
    with pytest.raises(ValueError):
        apply_bitmask_numpy(logits, bitmask[:, :2])


def test_structural_tag_constrains_only_inside_the_tags(qwen: Model) -> None:
    tag = {"type": "structural_tag", "triggers": ["<function="], "structures": [{
        "begin": "<function=get_weather>", "schema": _PARAMETERS["get_weather"], "end": "</function>"}]}
    compiled = qwen.compile(StructuredOutputsParams(structural_tag=json.dumps(tag)))

    def accepts(text: str) -> bool:
        matcher = compiled.new_matcher()
        return matcher.accept_tokens(qwen.tokenizer.encode(text)) and matcher.accept_token(qwen.eos[0])

    assert accepts("Any free text at all, even {braces}.")
    assert accepts('Let me look. <function=get_weather>{"city": "Paris", "unit": "c"}</function> Done.')
    assert not accepts('<function=get_weather>{"city": "Paris", "unit": "kelvin"}</function>')
    with pytest.raises(ValueError, match="starts with none of the triggers"):
        qwen.compile(StructuredOutputsParams(structural_tag=json.dumps(dict(tag, triggers=["<tool>"]))))


@pytest.mark.parametrize(("response_format", "structured_outputs", "expected"), [
    (None, None, None),
    ({"type": "text"}, None, None),
    ({"type": "json_object"}, None, StructuredOutputsParams(json_object=True)),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA, "strict": True}}, None,
     StructuredOutputsParams(json=PERSON_SCHEMA)),
    (None, {"regex": "[0-9]+", "disable_any_whitespace": True}, StructuredOutputsParams(regex="[0-9]+")),
    (None, {"choice": ["a", "b"]}, StructuredOutputsParams(choice=["a", "b"])),
    ({"type": "json_object"}, {"json_object": True}, StructuredOutputsParams(json_object=True)),
])
def test_request_fields_to_spec(response_format, structured_outputs, expected) -> None:
    assert structured_outputs_from_request(response_format, structured_outputs) == expected


@pytest.mark.parametrize(("response_format", "structured_outputs", "message"), [
    ({"type": "json_schema", "json_schema": {"name": "p"}}, None, "json_schema.schema"),
    ({"type": "yaml"}, None, "'yaml'"),
    (None, {"regexp": "a"}, "regexp"),
    ({"type": "json_object"}, {"regex": "a"}, "one kind"),
])
def test_malformed_request_fields(response_format, structured_outputs, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        structured_outputs_from_request(response_format, structured_outputs)


# ---- forced tool calls that always finish; --structured-outputs-config (issue 20) ----

OPEN_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                    "extra": {"type": "object"}}, "required": ["city", "unit"]}
OPEN_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": OPEN_PARAMETERS}}]


def _accepts(compiled, model: Model, text: str) -> bool:
    matcher = compiled.new_matcher()
    return matcher.accept_tokens(model.tokenizer.encode(text)) and matcher.accept_token(model.eos[0])


def test_close_objects_as_vllm_disable_additional_properties_and_as_xgrammar_strict() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object"}, "b": {"anyOf": [
        {"type": "object", "properties": {"x": {}}}, {"type": "object", "additionalProperties": True}]}},
        "$defs": {"d": {"properties": {"y": {}}}}}
    declared = close_objects(schema, every_object=False)
    assert declared["additionalProperties"] is False and declared["$defs"]["d"]["additionalProperties"] is False
    assert declared["properties"]["b"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in declared["properties"]["a"]  # declares nothing: vLLM leaves it open
    assert declared["properties"]["b"]["anyOf"][1]["additionalProperties"] is True  # set: kept
    strict = close_objects(schema, every_object=True)
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["b"]  # its branches say which keys it takes
    assert "additionalProperties" not in schema  # the input is left as it is


def test_bound_open_values_shares_the_budget() -> None:
    schema = {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": ["string", "null"]}, "c": {"type": "string", "minLength": 40},
        "kept": {"type": "string", "maxLength": 500}, "e": {"enum": ["x"]}, "p": {"type": "string", "pattern": "a+"},
        "f": {"type": "string", "format": "date"}, "n": {"type": "integer", "minimum": 0},
        "list": {"type": "array", "items": {"type": "integer", "maximum": 9}, "minItems": 20},
        "tags": {"type": "array", "items": {"type": "string"}}}}
    props = bound_open_values(schema, max_tokens=120)["properties"]
    assert props["tags"]["maxItems"] == 15  # 120 // 8
    # 3 free strings, and the tags' item up to 15 times, share 60 characters
    assert props["a"]["maxLength"] == props["b"]["maxLength"] == props["tags"]["items"]["maxLength"] == 3
    assert props["c"]["maxLength"] == 40 and props["kept"]["maxLength"] == 500
    assert not any("maxLength" in props[k] for k in ("e", "p", "f"))
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (0, 2**53 - 1)
    assert props["list"]["maxItems"] == 20 and props["list"]["items"] == {"type": "integer", "maximum": 9,
                                                                           "minimum": -(2**53 - 1)}
    assert "maxLength" not in schema["properties"]["a"]


def test_a_forced_call_is_compact_closed_and_fits_max_tokens(qwen: Model) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    compiled = qwen.compile(tool_choice_constraint(OPEN_TOOLS, named, max_tokens=64).structured_outputs)
    assert _accepts(compiled, qwen, '{"city":"New  York","unit":"c","extra":{}}')  # whitespace inside strings
    assert not _accepts(compiled, qwen, '{"city": "Paris", "unit": "c"}')
    assert not _accepts(compiled, qwen, '{"city":"Paris","unit":"c","country":"FR"}')  # undeclared
    assert not _accepts(compiled, qwen, '{"city":"Paris","unit":"c","extra":{"k":1}}')  # {"type": "object"}: {}
    assert _accepts(compiled, qwen, '{"city":"' + "x" * 32 + '","unit":"f"}')  # half of 64 tokens
    assert not _accepts(compiled, qwen, '{"city":"' + "x" * 33 + '","unit":"f"}')
    unbounded = qwen.compile(tool_choice_constraint(OPEN_TOOLS, named).structured_outputs)
    assert _accepts(unbounded, qwen, '{"city":"' + "x" * 500 + '","unit":"f"}')


@pytest.mark.parametrize(("max_tokens", "calls"), [(64, 1), (128, 2), (None, 5)])
def test_required_calls_are_as_many_as_fit_max_tokens(qwen: Model, max_tokens: int | None, calls: int) -> None:
    compiled = qwen.compile(tool_choice_constraint(OPEN_TOOLS, "required", max_tokens=max_tokens).structured_outputs)
    call = '{"name":"get_weather","parameters":{"city":"Oslo","unit":"c"}}'
    assert _accepts(compiled, qwen, "[" + ",".join([call] * calls) + "]")
    if max_tokens is not None:
        assert not _accepts(compiled, qwen, "[" + ",".join([call] * (calls + 1)) + "]")


@pytest.mark.parametrize(("options", "spaced", "undeclared"), [
    (StructuredOutputsConfig(), True, True),  # vLLM's defaults: flexible whitespace, open objects
    (StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True), False, True),
    (StructuredOutputsConfig(backend="guidance", disable_additional_properties=True), True, False),
])
def test_structured_outputs_config_applies_to_json_schemas(qwen: Model, options: StructuredOutputsConfig,
                                                           spaced: bool, undeclared: bool) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def accepts(spec: StructuredOutputsParams, text: str) -> bool:
        return _accepts(compile_grammar(spec, qwen.tokenizer, qwen.vocab_size, qwen.eos, options), qwen, text)

    assert accepts(StructuredOutputsParams(json=schema), '{"a":1}')
    assert accepts(StructuredOutputsParams(json=schema), '{"a": 1}') is spaced
    assert accepts(StructuredOutputsParams(json=schema), '{"a":1,"b":2}') is undeclared
    assert accepts(StructuredOutputsParams(json_object=True), '{"b":2}')  # declares nothing: stays open
    assert accepts(StructuredOutputsParams(json_object=True), '{"b": 2}') is spaced
