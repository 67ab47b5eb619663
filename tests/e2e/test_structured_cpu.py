"""Constrained decoding by the real engine on CPU, with random weights: whatever the logits say, the output
satisfies the constraint. Offline (`LLM.generate` / `LLM.chat`) on stories260K and on a random 2-layer
Qwen2 with the Qwen2.5 tokenizer's full vocabulary, and through the server with the official `openai` SDK:
`tool_choice="required"` and a named tool always give a call whose arguments validate, json_schema 20 of
20 times, `choice` and `regex` hold. Schemas bound their strings: an open `json_object` only ends when the
model wants it to (tests/tools samples it with a sampler that wraps up; tests/serve checks the wiring). A forced
call needs no such bounds: with max_tokens 64, calls to an open schema finish 20 of 20 times (issue 20).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import transformers

from jaxllm import LLM, SamplingParams
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.sampling_params import StructuredOutputsParams
from serve.app import ServingContext
from serve.args import ServerArgs
from tests.e2e.conftest import COMMON, assert_pool_free
from tests.fixtures import fixture_tokenizer
from tests.models.hf_tiny import COMMON as TINY
from tests.serve.conftest import LiveServer

QWEN_MODEL_VOCAB = 151936  # Qwen2.5 pads its embedding past the tokenizer's 151665 tokens
NAME = "qwen-random"
# NOTE: strings are bounded: with random weights, an unbounded string closes only when the sampler happens
# to pick a quote among ~150k allowed tokens, which takes longer than any max_tokens.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16},
                   "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1,
                                                                         "maximum": 7}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
                   "city": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}},
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]
REGEX = r"(Lily|Tom) (ran|sat) [a-z]{2,8}\."
NAMES = ["Lily", "Tom", "the big dog"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """A random 2-layer, hidden-64 Qwen2 (dummy weights) over the real Qwen2.5 tokenizer and chat template."""
    model_dir = tmp_path_factory.mktemp("qwen-random")
    transformers.Qwen2Config(**{**TINY, "vocab_size": QWEN_MODEL_VOCAB}, tie_word_embeddings=True,
                             rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"]).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_tokenizer("qwen2.5") / name, model_dir / name)
    return LLM(str(model_dir), load_format="dummy", max_model_len=1024, max_num_batched_tokens=64,
               token_buckets=[16, 64], served_model_name=[NAME], **COMMON)


# ---- offline: these run before the server takes the engine over (the `server` fixture, below) ----

@pytest.mark.parametrize(("spec", "holds"), [
    (StructuredOutputsParams(json=PERSON), lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    (StructuredOutputsParams(choice=NAMES), lambda text: text in NAMES),
    (StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text) is not None),
])
def test_offline_constraints_hold_on_stories260k(llm: LLM, spec: StructuredOutputsParams, holds: Any) -> None:
    prompts = ["Once upon a time", "Lily and Tom", "The dog"] * 4
    params = [SamplingParams(seed=i, temperature=1.0, max_tokens=120, structured_outputs=spec) for i in range(12)]
    params.append(SamplingParams(seed=0, max_tokens=30, ignore_eos=True))  # an unconstrained neighbour
    outputs = llm.generate([*prompts, "Once"], params, use_tqdm=False)
    for out in outputs[:-1]:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop" and holds(completion.text), completion.text
    assert len(outputs[-1].outputs[0].token_ids) == 30
    assert_pool_free(llm)


def test_offline_chat_renders_tools_and_fed_back_calls(qwen: LLM) -> None:
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "21 degrees"},
    ]
    spec = StructuredOutputsParams(json=PERSON)
    out = qwen.chat(conversation, SamplingParams(seed=1, max_tokens=150, structured_outputs=spec), use_tqdm=False,
                    tools=TOOLS)[0]
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n" in out.prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
           in out.prompt  # parsed, so the template's `tojson` writes an object, not a string
    assert "<tool_response>\n21 degrees\n</tool_response>" in out.prompt
    jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


# ---- through the server ----

@pytest.fixture(scope="module")
def server(qwen: LLM) -> Iterator[LiveServer]:
    args = ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes")
    ctx = ServingContext(engine=AsyncEngine(qwen.engine), args=args)
    with LiveServer(ctx) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(message: Any, only: str | None = None) -> None:
    assert message.tool_calls, message.content
    for call in message.tool_calls:
        assert call.function.name == only if only else call.function.name in PARAMETERS
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_required_tool_choice_always_calls_a_tool(client: openai.OpenAI) -> None:
    # NOTE: one call each (parallel_tool_calls=False caps the array): random weights end a list of calls only
    # when the sampler happens to pick "]" over "," and whitespace, so a parallel list can outrun max_tokens.
    out = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", n=8,
                                         seed=0, max_tokens=400, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message)
    with client.chat.completions.stream(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", n=4,
                                        seed=100, max_tokens=400, parallel_tool_calls=False) as stream:
        streamed = stream.get_final_completion()
    for choice in streamed.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message)


def test_a_named_tool_is_always_the_call(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice=named, n=8, seed=0,
                                         max_tokens=200)
    for choice in out.choices:
        assert choice.finish_reason == "stop" and len(choice.message.tool_calls) == 1  # OpenAI's: "stop" when named
        assert_valid_calls(choice.message, only="get_weather")
    with client.chat.completions.stream(model=NAME, messages=ASK, tools=TOOLS, tool_choice=named, seed=7,
                                        max_tokens=200) as stream:
        assert_valid_calls(stream.get_final_completion().choices[0].message, only="get_weather")


def test_json_schema_response_format_validates_20_of_20(server: LiveServer) -> None:
    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        return await asyncio.gather(*(
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Describe someone."}],
                                           response_format=response_format, seed=seed, max_tokens=400)
            for seed in range(20)))

    for out in asyncio.run(run()):
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_choice_and_regex_hold(client: openai.OpenAI) -> None:
    choices = ["sunny", "rainy", "no idea"]
    picked = client.chat.completions.create(model=NAME, messages=ASK, n=6, seed=1, max_tokens=20,
                                            extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices for c in picked.choices)
    matched = client.completions.create(model=NAME, prompt=["Once upon a time", "Hello"], n=3, seed=2, max_tokens=30,
                                        extra_body={"structured_outputs": {"regex": REGEX}})
    assert all(re.fullmatch(REGEX, c.text) for c in matched.choices), [c.text for c in matched.choices]


# ---- forced calls with an open schema, as vLLM users write them (issue 20) ----

# NOTE: nothing bounds this schema: no maxLength, no additionalProperties. The server's forced-call grammar
# (compact JSON, closed objects, values bounded to the max_tokens budget) is what ends each call.
FORECAST_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
FORECAST_TOOLS = [{"type": "function", "function": {"name": "get_forecast", "parameters": FORECAST_PARAMETERS}}]
FORECAST_CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "get_forecast"}}}


async def _forced_call(client: openai.AsyncOpenAI, tool_choice: Any, stream: bool, seed: int,
                       temperature: float) -> Any:
    kwargs = dict(model=NAME, messages=ASK, tools=FORECAST_TOOLS, tool_choice=tool_choice, seed=seed,
                  temperature=temperature, max_tokens=64)
    if not stream:
        return (await client.chat.completions.create(**kwargs)).choices[0]
    async with client.chat.completions.stream(**kwargs) as events:
        return (await events.get_final_completion()).choices[0]


def test_forced_calls_to_an_open_schema_finish_20_of_20(server: LiveServer) -> None:
    """Seeds 0-19 for each of "required" and named, streamed and not (each at temperature 0.8 one way and 1.0
    the other), all 80 calls at once: every call ends within 64 tokens and its arguments validate (vLLM's
    finish reasons: "tool_calls", and "stop" for a named one)."""
    groups = [("required", False, 0.8), ("required", True, 1.0), ("named", False, 1.0), ("named", True, 0.8)]
    cases = [(choice, stream, seed, temperature) for choice, stream, temperature in groups for seed in range(20)]

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(_forced_call(client, FORECAST_CHOICES[choice], stream, seed, temperature)
                                          for choice, stream, seed, temperature in cases))

    for (choice, *_), out in zip(cases, asyncio.run(run()), strict=True):
        assert out.finish_reason == ("tool_calls" if choice == "required" else "stop"), out.message
        assert out.message.tool_calls, out.message.content
        for call in out.message.tool_calls:
            assert call.function.name == "get_forecast"
            jsonschema.validate(json.loads(call.function.arguments), FORECAST_PARAMETERS)
