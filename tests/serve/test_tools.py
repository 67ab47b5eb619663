"""Tool calls (hermes, `--enable-auto-tool-choice`) and reasoning (`--reasoning-parser qwen3`) through the
official `openai` SDK, streamed and not, with the Qwen2.5 chat template and tokenizer.

The model is a `FakeModelRunner` that parrots the conversation's last user turn, token for token, then
ends its turn: a test writes the model output it wants as the user message. (Decoding constrained to a
tool call needs real logits: tests/e2e/test_structured_cpu.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from jaxllm.config import CacheConfig, EngineConfig, EngineLimits, ModelConfig, SchedulerConfig
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.tokenizer import load_tokenizer
from tests.engine.fake_runner import FakeModelRunner
from tests.fixtures import fixture_tokenizer
from tests.serve.conftest import API_KEY, MODEL_NAMES, LiveServer, make_context, pool_is_free, wait_until

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
PARIS = {"city": "Paris", "unit": "celsius"}
ROME = {"city": "Rome"}


def hermes(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def says(text: str) -> list[dict[str, Any]]:
    """A conversation after which the parrot writes exactly `text`."""
    return [{"role": "user", "content": text}]


def parrot_engine(tokenizer: Any) -> AsyncEngine:
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def next_token(context: list[int], seed: int) -> int:
        # ... <|im_start|> user \n SAID <|im_end|> \n <|im_start|> assistant \n OUTPUT
        header = len(context) - 1 - context[::-1].index(im_start)
        user = header - 1 - context[header - 1::-1].index(im_start)
        said = context[user + 3:header - 2]
        written = len(context) - (header + 3)
        return said[written] if written < len(said) else im_end

    config = EngineConfig(model=ModelConfig(model=str(fixture_tokenizer("qwen2.5")), served_model_name=MODEL_NAMES),
                          cache=CacheConfig(block_size=16),
                          scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048,
                                                    async_scheduling=False))
    runner = FakeModelRunner(len(tokenizer), 16, next_token_fn=next_token, delay_s=0.001)
    limits = EngineLimits.given(config, max_model_len=2048, num_pages=256)
    return AsyncEngine(LLMEngine(config, limits, runner, tokenizer, len(tokenizer), (im_end,), log_stats=False))


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Any:
    return load_tokenizer(fixture_tokenizer("qwen2.5"))


def _serve(tokenizer: Any, **args: Any) -> Iterator[LiveServer]:
    ctx = make_context(parrot_engine(tokenizer), enable_auto_tool_choice=True, tool_call_parser="hermes", **args)
    with LiveServer(ctx) as server:
        yield server
    assert pool_is_free(ctx.engine)


@pytest.fixture(scope="module")
def tools_server(qwen_tokenizer: Any) -> Iterator[LiveServer]:
    """--enable-auto-tool-choice --tool-call-parser hermes."""
    yield from _serve(qwen_tokenizer)


@pytest.fixture(scope="module")
def thinking_server(qwen_tokenizer: Any) -> Iterator[LiveServer]:
    """The same, plus --reasoning-parser qwen3."""
    yield from _serve(qwen_tokenizer, reasoning_parser="qwen3")


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture()
def client(tools_server: LiveServer) -> openai.OpenAI:
    return _client(tools_server)


@pytest.fixture()
def thinking(thinking_server: LiveServer) -> openai.OpenAI:
    return _client(thinking_server)


def chat(client: openai.OpenAI, output: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL_NAMES[0], messages=says(output), max_tokens=200, **kwargs)


def streamed(client: openai.OpenAI, output: str, **kwargs: Any) -> Any:
    """The completion as the SDK's streaming helper accumulates it."""
    with client.chat.completions.stream(model=MODEL_NAMES[0], messages=says(output), max_tokens=200,
                                        **kwargs) as stream:
        return stream.get_final_completion()


def raw_chunks(client: openai.OpenAI, output: str, **kwargs: Any) -> list[Any]:
    return list(client.chat.completions.create(model=MODEL_NAMES[0], messages=says(output), max_tokens=200,
                                               stream=True, **kwargs))


def calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.parametrize("before", ["", "Let me look that up.\n\n"])
def test_a_hermes_call_becomes_tool_calls_streamed_or_not(client: openai.OpenAI, before: str) -> None:
    output = before + hermes("get_weather", PARIS)
    for completion in (chat(client, output, tools=TOOLS), streamed(client, output, tools=TOOLS)):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert calls(choice.message) == [("get_weather", PARIS)]
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert (choice.message.content or "") == before


def test_stream_sends_the_name_first_then_argument_fragments(client: openai.OpenAI) -> None:
    chunks = raw_chunks(client, "Sure. " + hermes("get_weather", PARIS) + hermes("get_time", {"zone": "CET"}),
                        tools=TOOLS)
    assert chunks[0].choices[0].delta.role == "assistant"
    entries = [entry for c in chunks for entry in c.choices[0].delta.tool_calls or []]
    for index, (name, arguments) in enumerate([("get_weather", PARIS), ("get_time", {"zone": "CET"})]):
        mine = [e for e in entries if e.index == index]
        assert mine[0].id and mine[0].type == "function" and mine[0].function.name == name
        assert all(e.id is None and e.function.name is None for e in mine[1:])
        assert json.loads("".join(e.function.arguments or "" for e in mine)) == arguments
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Sure. "
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]


def test_parallel_tool_calls_false_keeps_only_the_first(client: openai.OpenAI) -> None:
    output = hermes("get_weather", PARIS) + "\n" + hermes("get_weather", ROME)
    assert calls(chat(client, output, tools=TOOLS).choices[0].message) == [("get_weather", PARIS),
                                                                           ("get_weather", ROME)]
    for completion in (chat(client, output, tools=TOOLS, parallel_tool_calls=False),
                       streamed(client, output, tools=TOOLS, parallel_tool_calls=False)):
        assert calls(completion.choices[0].message) == [("get_weather", PARIS)]


@pytest.mark.parametrize("output", [
    '<tool_call>\n{"name": get_weather, "arguments": {"city": "Paris"}}\n</tool_call>',  # not JSON
    '<tool_call>\n["get_weather", "Paris"]\n</tool_call>',  # JSON, not a call
    "No tools needed: it is sunny.",
])
def test_text_that_is_not_a_call_stays_content(client: openai.OpenAI, output: str) -> None:
    for completion in (chat(client, output, tools=TOOLS), streamed(client, output, tools=TOOLS)):
        choice = completion.choices[0]
        assert choice.message.content == output and not choice.message.tool_calls
        assert choice.finish_reason == "stop"


def test_a_call_cut_short(client: openai.OpenAI) -> None:
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    choice = chat(client, output, tools=TOOLS).choices[0]
    assert choice.message.content == output and not choice.message.tool_calls
    # A stream cannot take back what it sent: the call's name and the arguments so far (as vLLM's).
    call = streamed(client, output, tools=TOOLS).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Par'


def test_tool_choice_none_leaves_a_call_in_the_content(client: openai.OpenAI) -> None:
    output = hermes("get_weather", PARIS)
    choice = chat(client, output, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == output and not choice.message.tool_calls and choice.finish_reason == "stop"


def test_logprobs_of_held_back_text_still_arrive(client: openai.OpenAI) -> None:
    chunks = raw_chunks(client, "Hm. " + hermes("get_weather", PARIS), tools=TOOLS, logprobs=True,
                        stream_options={"include_usage": True})
    positions = [p for c in chunks if c.choices and c.choices[0].logprobs for p in c.choices[0].logprobs.content]
    assert len(positions) == chunks[-1].usage.completion_tokens


def test_a_tool_result_fed_back_renders_through_the_template(client: openai.OpenAI, tools_server: LiveServer,
                                                             qwen_tokenizer: Any) -> None:
    first = chat(client, hermes("get_weather", PARIS), tools=TOOLS).choices[0].message
    conversation = [
        {"role": "user", "content": "What is the weather in Paris?"},
        first.to_dict(),  # arguments as the JSON text the server sent
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temperature": 21}'},
    ]
    with httpx.Client(base_url=tools_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        ids = http.post("/tokenize", json={"messages": conversation, "tools": TOOLS}).json()["tokens"]
    prompt = qwen_tokenizer.decode(ids)
    # the arguments as an object (the template's `tojson`), not a JSON string inside a string
    assert hermes("get_weather", PARIS) + "<|im_end|>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>\n' \
           '<|im_start|>assistant\n' in prompt
    reply = client.chat.completions.create(model=MODEL_NAMES[0], messages=conversation, tools=TOOLS, max_tokens=40)
    assert reply.choices[0].message.content.startswith("<tool_response>\n")  # the parrot read the tool turn


def test_reasoning_is_split_off_streamed_or_not(thinking: openai.OpenAI) -> None:
    output = "<think>The user greets me.</think>\n\nHello there!"
    for completion in (chat(thinking, output), streamed(thinking, output)):
        message = completion.choices[0].message
        assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == "The user greets me."
        assert message.content == "\n\nHello there!"
    chunks = raw_chunks(thinking, output)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    assert reasoning == "The user greets me."


def test_thinking_disabled_leaves_everything_content(thinking: openai.OpenAI) -> None:
    output = "<think>x</think>Hello"
    for completion in (chat(thinking, output, extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
                       streamed(thinking, output, extra_body={"chat_template_kwargs": {"enable_thinking": False}})):
        message = completion.choices[0].message
        assert message.content == output and message.model_extra.get("reasoning") is None


def test_reasoning_then_a_tool_call(thinking: openai.OpenAI) -> None:
    output = "<think>I need the weather.</think>\n\n" + hermes("get_weather", PARIS)
    for completion in (chat(thinking, output, tools=TOOLS), streamed(thinking, output, tools=TOOLS)):
        choice = completion.choices[0]
        assert choice.message.model_extra["reasoning_content"] == "I need the weather."
        assert calls(choice.message) == [("get_weather", PARIS)] and choice.finish_reason == "tool_calls"
        assert (choice.message.content or "").strip() == ""


def test_include_reasoning_false_drops_it(thinking: openai.OpenAI) -> None:
    output = "<think>secret</think>answer"
    for completion in (chat(thinking, output, extra_body={"include_reasoning": False}),
                       streamed(thinking, output, extra_body={"include_reasoning": False})):
        message = completion.choices[0].message
        assert message.content == "answer" and message.model_extra.get("reasoning_content") is None


def test_n_choices_each_parse_their_own_output(thinking: openai.OpenAI, thinking_server: LiveServer) -> None:
    output = "<think>a</think>" + hermes("get_time", {"zone": "UTC"})
    for completion in (chat(thinking, output, tools=TOOLS, n=3), streamed(thinking, output, tools=TOOLS, n=3)):
        assert [calls(c.message) for c in completion.choices] == [[("get_time", {"zone": "UTC"})]] * 3
    wait_until(lambda: pool_is_free(thinking_server.ctx.engine))
