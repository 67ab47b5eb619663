"""The grammar seam end to end: LLMEngine + FakeModelRunner (which samples the first allowed token at or
after its rule's choice) + `make_grammar_compiler` over the stories260K tokenizer."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer

from jaxllm.engine.core import CommandQueue, EngineCore, EngineInfo
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.structured import make_grammar_compiler, tool_choice_constraint
from serve.tool_parsers import ConstrainedToolParser
from tests.engine.conftest import VOCAB_SIZE, add, new_llm_engine, run_to_completion

STORIES = "jaxllm/data/stories260K"

SCHEMA = {
    "type": "object",
    "properties": {"hero": {"type": "string", "minLength": 1, "maxLength": 10},
                   "age": {"type": "integer", "minimum": 1, "maximum": 99},
                   "mood": {"enum": ["happy", "sad"]}},
    "required": ["hero", "age", "mood"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "find_toy", "parameters": {
    "type": "object", "properties": {"toy": {"enum": ["ball", "doll", "kite"]}}, "required": ["toy"],
    "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_constrained_requests_beside_free_ones(tokenizer, async_scheduling: bool) -> None:
    engine = new_llm_engine(tokenizer, max_model_len=512, num_pages=256, max_num_seqs=8,
                            async_scheduling=async_scheduling,
                            grammar_compiler=make_grammar_compiler(tokenizer, VOCAB_SIZE))
    named = tool_choice_constraint(TOOLS, {"type": "function", "function": {"name": "find_toy"}})
    specs = {
        "json": StructuredOutputsParams(json=SCHEMA),
        "choice": StructuredOutputsParams(choice=["Lily", "Tom", "the dog"]),
        "regex": StructuredOutputsParams(regex=r"[a-z]{2,6}( [a-z]{2,6}){1,3}\."),
        "tool": named.structured_outputs,
    }
    prompt = tokenizer.encode("Once upon a time")
    for name, spec in specs.items():
        params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=150, structured_outputs=spec)
        add(engine, name, prompt, params)
    add(engine, "free", prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    outputs = run_to_completion(engine)

    assert len(outputs["free"].outputs[0].token_ids) == 20  # an unconstrained neighbour is untouched
    for name in specs:
        for completion in outputs[name].outputs:
            assert completion.finish_reason == "stop", (name, completion.text)
            text = completion.text
            if name == "json":
                jsonschema.validate(json.loads(text), SCHEMA)
            elif name == "choice":
                assert text in {"Lily", "Tom", "the dog"}
            elif name == "regex":
                assert re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){1,3}\.", text), text
            else:
                call = ConstrainedToolParser(named.function_name).extract_tool_calls(text, {}).tool_calls[0]
                assert call["function"]["name"] == "find_toy"
                jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])


def test_a_spec_that_does_not_compile_ends_only_its_request_with_an_error(tokenizer) -> None:
    engine = new_llm_engine(tokenizer, grammar_compiler=make_grammar_compiler(tokenizer, VOCAB_SIZE))
    info = EngineInfo.describe(engine)
    bad = SamplingParams(n=2, structured_outputs=StructuredOutputsParams(json={"type": "array", "uniqueItems": True}))
    commands = CommandQueue()
    commands.put(info.new_request("bad", [1, 5, 6], bad),
                 info.new_request("ok", [1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))
    outputs = {}
    EngineCore(engine).run(commands, lambda step: outputs.update({o.request_id: o for o in step}), until_idle=True)
    assert outputs["bad"].finished and "uniqueItems" in outputs["bad"].error
    assert [s.finish_reason for s in outputs["bad"].sequences] == ["error", "error"]
    assert outputs["ok"].error is None and outputs["ok"].sequences[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
