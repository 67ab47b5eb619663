"""gpt-oss's harmony output (serve.harmony, serve.harmony_chat) on hand-written token sequences in OpenAI's
published format (openai/harmony, docs/format.md), then served end to end through the openai SDK with
`--reasoning-parser openai_gptoss --tool-call-parser openai`, and without flags for a model whose config.json
says `model_type: gpt_oss` (harmony on, as vLLM's) or another model type (harmony off).

The tokenizer is a tiny byte-level BPE carrying the harmony special tokens, built here at session scope with the
minimal template of tests/fixtures/harmony-tokenizer/ (its SOURCE.md says how). The served model is a
`FakeModelRunner` that writes the harmony output the test names in its last user message.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxllm.config import CacheConfig, EngineConfig, EngineLimits, ModelConfig, SchedulerConfig
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.tokenizer import load_tokenizer
from serve.harmony import GptOssReasoningParser, Header, harmony_tokens, parse_header
from serve.harmony_chat import HarmonyOutputParsers, harmony_output_parsers
from serve.tool_parsers.openai import OpenAIToolParser
from tests.engine.fake_runner import FakeModelRunner
from tests.serve.conftest import API_KEY, MODEL_NAMES, STORIES, LiveServer, make_context, pool_is_free

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "harmony-tokenizer"
SPECIAL_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
CORPUS = ["User asks: What is the weather in San Francisco? Need to use function get_weather.",
          "assistant analysis commentary final to=functions.get_weather json location",
          "The weather is sunny, 20 degrees. Reasoning: low, medium or high."]

# docs/format.md's examples: reasoning then the answer; a call, its recipient after the channel and before it;
# a preamble (commentary to the user) before a call.
ANSWER = ('<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>'
          "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>")
CALL = ("<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>"
        'commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"San Francisco"}<|call|>')
CALL_IN_ROLE = ("<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant "
                'to=functions.get_weather<|channel|>commentary json<|message|>{"location":"San Francisco"}<|call|>')
PREAMBLE = ("<|channel|>analysis<|message|>Two files.<|end|><|start|>assistant<|channel|>commentary<|message|>"
            "**Action plan**: write the page.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.generate_file<|constrain|>json<|message|>{"path": "index.html"}<|call|>')
SCRIPTS = {"answer": ANSWER, "call": CALL, "call-in-role": CALL_IN_ROLE, "preamble": PREAMBLE}
THOUGHT, REPLY = 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', "2 + 2 = 4."
SF = {"location": "San Francisco"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"location": {"type": "string"}}}}}


@pytest.fixture(scope="session")
def harmony_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json, tokenizer_config.json and the fixture's chat_template.jinja (see its SOURCE.md)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(SPECIAL_TOKENS)  # after the BPE vocabulary: nothing like o200k's ids
    directory = tmp_path_factory.mktemp("harmony-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|return|>").save_pretrained(directory)
    shutil.copy(FIXTURE / "chat_template.jinja", directory / "chat_template.jinja")
    return directory


@pytest.fixture(scope="session")
def tok(harmony_dir: Path) -> Any:
    return load_tokenizer(harmony_dir)


def ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def parsers(tok: Any, tools: bool = True, **request: Any) -> HarmonyOutputParsers:
    found = harmony_output_parsers(GptOssReasoningParser(), OpenAIToolParser() if tools else None, request, tok)
    assert found is not None
    return found


def stream_deltas(tok: Any, text: str, tools: bool = True, **request: Any) -> list[dict[str, Any]]:
    """The deltas of `text`'s tokens fed one at a time (the engine's worst case: a chunk per token)."""
    stream = parsers(tok, tools, **request).stream()
    return [d for d in (stream.feed("", [token]) for token in ids(tok, text)) if d]


def joined(deltas: list[dict[str, Any]], key: str) -> str:
    return "".join(d.get(key, "") for d in deltas)


@pytest.mark.parametrize(("header", "expected"), [
    ("<|channel|>final", Header("final", None, None)),
    ("<|channel|>commentary to=functions.f <|constrain|>json", Header("commentary", "functions.f", "json")),
    ("<|channel|>commentary to=functions.f<|constrain|>json", Header("commentary", "functions.f", "json")),
    ("assistant to=functions.f<|channel|>commentary json", Header("commentary", "functions.f", "json")),
    ("assistant<|channel|>analysis to=python code", Header("analysis", "python", "code")),
])
def test_header_parsing(header: str, expected: Header) -> None:
    assert parse_header(header) == expected


def test_special_tokens_come_from_the_tokenizer(tok: Any, stories_tokenizer: Any) -> None:
    tokens = harmony_tokens(tok)
    assert tokens is not None
    start, end, message, channel, _, return_, call = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert (tokens.start, tokens.message, tokens.channel, tokens.message_ends) == (
        start, message, channel, {end, return_, call})
    assert start != 200006  # o200k_harmony's <|start|>: never assumed
    # A tokenizer without them: no harmony parsing (the server leaves the output as plain content).
    assert harmony_tokens(stories_tokenizer) is None
    assert harmony_output_parsers(GptOssReasoningParser(), None, {}, stories_tokenizer) is None


def test_reasoning_then_the_answer(tok: Any) -> None:
    parsed = parsers(tok).parse("", ids(tok, ANSWER))
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == (THOUGHT, REPLY, [])
    deltas = stream_deltas(tok, ANSWER)
    # vLLM's deltas: reasoning (under both names) while the analysis message lasts, then content; nothing else.
    kinds = [sorted(d) for d in deltas]
    first_content = kinds.index(["content"])
    assert kinds[:first_content] == [["reasoning", "reasoning_content"]] * first_content
    assert kinds[first_content:] == [["content"]] * (len(kinds) - first_content)
    assert all(d["reasoning"] == d["reasoning_content"] for d in deltas[:first_content])
    assert (joined(deltas, "reasoning"), joined(deltas, "content")) == (THOUGHT, REPLY)


@pytest.mark.parametrize("output", [CALL, CALL_IN_ROLE])
def test_a_call_with_its_recipient_after_or_before_the_channel(tok: Any, output: str) -> None:
    parsed = parsers(tok).parse("", ids(tok, output))
    assert (parsed.reasoning, parsed.content) == ("Need to use function get_weather.", None)
    [call] = parsed.tool_calls
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"location":"San Francisco"}'}
    deltas = stream_deltas(tok, output)
    entries = [entry for d in deltas for entry in d.get("tool_calls", [])]
    # The id and name as soon as the header is read, then the arguments as their tokens come.
    assert entries[0] == {"index": 0, "id": entries[0]["id"], "type": "function",
                          "function": {"name": "get_weather"}}
    assert all(e.keys() == {"index", "function"} and e["function"].keys() == {"arguments"} for e in entries[1:])
    assert json.loads("".join(e["function"]["arguments"] for e in entries[1:])) == SF
    assert joined(deltas, "reasoning") == "Need to use function get_weather." and not joined(deltas, "content")


def test_a_preamble_is_content_and_the_call_follows(tok: Any) -> None:
    parsed = parsers(tok).parse("", ids(tok, PREAMBLE))
    assert (parsed.reasoning, parsed.content) == ("Two files.", "**Action plan**: write the page.")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("generate_file", {"path": "index.html"})]


def test_calls_are_dropped_when_the_request_reads_none(tok: Any) -> None:
    parsed = parsers(tok, tools=False).parse("", ids(tok, CALL))
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == ("Need to use function get_weather.", None, [])


def test_parallel_tool_calls_false_keeps_the_first(tok: Any) -> None:
    second = '<|start|>assistant<|channel|>commentary to=functions.get_time<|message|>{}<|call|>'
    output = CALL.removesuffix("<|call|>") + "<|end|>" + second
    assert len(parsers(tok).parse("", ids(tok, output)).tool_calls) == 2
    [call] = parsers(tok, parallel_tool_calls=False).parse("", ids(tok, output)).tool_calls
    assert call["function"]["name"] == "get_weather"


@pytest.mark.parametrize(("cut_after", "reasoning", "content", "arguments"), [
    ("Simple arith", 'User asks: "What is 2 + 2?" Simple arith', None, None),
    ("final<|message|>2 + ", THOUGHT, "2 + ", None),
    ('{"location":"San', "Need to use function get_weather.", None, '{"location":"San'),
])
def test_an_unterminated_message_keeps_what_it_wrote(tok: Any, cut_after: str, reasoning: str, content: str | None,
                                                     arguments: str | None) -> None:
    """max_tokens cuts the output inside a message: its text so far stays in its field."""
    output = next(text for text in (ANSWER, CALL) if cut_after in text)
    cut = ids(tok, output[:output.index(cut_after) + len(cut_after)])
    assert cut == ids(tok, output)[:len(cut)]  # a prefix of the whole output's tokens
    parsed = parsers(tok).parse("", cut)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    assert [c["function"]["arguments"] for c in parsed.tool_calls] == ([arguments] if arguments else [])
    deltas = stream_deltas(tok, output[:output.index(cut_after) + len(cut_after)])
    assert (joined(deltas, "reasoning"), joined(deltas, "content") or None) == (reasoning, content)


def test_characters_split_across_tokens_come_whole(tok: Any) -> None:
    output = "<|channel|>final<|message|>Café 🙂<|return|>"
    assert len(ids(tok, "🙂")) == 4  # four byte tokens
    deltas = stream_deltas(tok, output)
    assert "\ufffd" not in joined(deltas, "content") and joined(deltas, "content") == "Café 🙂"


def test_two_messages_of_one_field_are_joined_by_a_newline(tok: Any) -> None:
    output = ("<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis<|message|>Second."
              "<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert parsers(tok).parse("", ids(tok, output)).reasoning == "First.\nSecond."
    assert joined(stream_deltas(tok, output), "reasoning") == "First.\nSecond."


def test_reasoning_tokens_are_the_analysis_contents(tok: Any) -> None:
    assert GptOssReasoningParser().count_reasoning_tokens(ids(tok, ANSWER), tok) == len(ids(tok, THOUGHT))
    assert GptOssReasoningParser().count_reasoning_tokens(ids(tok, "<|channel|>final<|message|>Hi"), tok) == 0


# ---- served end to end -------------------------------------------------------------------------------------------


def scripted_engine(tok: Any, eos: tuple[str, ...] = ("<|return|>", "<|call|>"),
                    model_type: str | None = None) -> AsyncEngine:
    """Writes SCRIPTS[name] for a last user message `name`, then <|return|> for ever; for `effort`, the answer is
    the prompt's `Reasoning:` level. It stops at `eos` (by default gpt-oss's generation config's <|return|> and
    <|call|>); `model_type`: config.json's, as the engine describes it."""
    user, assistant = ids(tok, "<|start|>user<|message|>"), ids(tok, "<|start|>assistant")
    end, return_ = tok.convert_tokens_to_ids(["<|end|>", "<|return|>"])
    scripts = {name: ids(tok, text) for name, text in SCRIPTS.items()}

    def next_token(context: list[int], seed: int) -> int:
        at = max(i for i in range(len(context)) if context[i:i + len(user)] == user) + len(user)
        said_end = context.index(end, at)
        name = tok.decode(context[at:said_end])
        if name == "effort":
            level = re.search(r"Reasoning: (\w+)", tok.decode(context)).group(1)
            script = ids(tok, f"<|channel|>final<|message|>{level}<|return|>")
        else:
            script = scripts[name]
        written = len(context) - (said_end + 1 + len(assistant))
        return script[written] if written < len(script) else return_

    config = EngineConfig(model=ModelConfig(model=str(STORIES), served_model_name=MODEL_NAMES),
                          cache=CacheConfig(block_size=16),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                                    async_scheduling=False))
    runner = FakeModelRunner(len(tok), 16, next_token_fn=next_token, delay_s=0.001)
    limits = EngineLimits.given(config, max_model_len=1024, num_pages=128)
    engine = LLMEngine(config, limits, runner, tok, len(tok), tok.convert_tokens_to_ids(list(eos)), log_stats=False)
    return AsyncEngine(engine, model_type=model_type)


@pytest.fixture(scope="module")
def server(tok: Any) -> Iterator[LiveServer]:
    ctx = make_context(scripted_engine(tok), reasoning_parser="openai_gptoss", tool_call_parser="openai",
                       enable_auto_tool_choice=True)
    with LiveServer(ctx) as live:
        yield live
    assert pool_is_free(ctx.engine)


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client: openai.OpenAI, script: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL_NAMES[0], messages=[{"role": "user", "content": script}],
                                          max_tokens=kwargs.pop("max_tokens", 200), **kwargs)


def streamed(client: openai.OpenAI, script: str, **kwargs: Any) -> Any:
    """The completion as the SDK's streaming helper accumulates it."""
    with client.chat.completions.stream(model=MODEL_NAMES[0], messages=[{"role": "user", "content": script}],
                                        max_tokens=kwargs.pop("max_tokens", 200), **kwargs) as stream:
        return stream.get_final_completion()


def test_served_reasoning_and_content_apart(client: openai.OpenAI, tok: Any) -> None:
    for completion in (chat(client, "answer"), streamed(client, "answer")):
        choice = completion.choices[0]
        assert choice.message.model_extra["reasoning_content"] == choice.message.model_extra["reasoning"] == THOUGHT
        assert (choice.message.content, choice.finish_reason) == (REPLY, "stop") and not choice.message.tool_calls
    usage = chat(client, "answer").usage
    assert usage.completion_tokens == len(ids(tok, ANSWER))
    assert usage.completion_tokens_details.reasoning_tokens == len(ids(tok, THOUGHT))


def test_served_stream_sends_reasoning_then_content(client: openai.OpenAI) -> None:
    chunks = list(chat(client, "answer", stream=True))
    deltas = [c.choices[0].delta for c in chunks[1:]]
    reasoning = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    content = [d.content or "" for d in deltas]
    assert "".join(reasoning) == THOUGHT and "".join(content) == REPLY
    assert max(i for i, r in enumerate(reasoning) if r) < min(i for i, c in enumerate(content) if c)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


@pytest.mark.parametrize("script", ["call", "call-in-role"])
def test_served_tool_call(client: openai.OpenAI, script: str) -> None:
    for completion in (chat(client, script, tools=[WEATHER]), streamed(client, script, tools=[WEATHER])):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.id.startswith("chatcmpl-tool-") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == SF
        assert choice.message.model_extra["reasoning_content"] == "Need to use function get_weather."
        assert not choice.message.content


def test_served_tool_choice_none_drops_the_call(client: openai.OpenAI) -> None:
    choice = chat(client, "call", tools=[WEATHER], tool_choice="none").choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("stop", None, [])
    assert choice.message.model_extra["reasoning_content"] == "Need to use function get_weather."


def test_served_max_tokens_cuts_the_reasoning(client: openai.OpenAI, tok: Any) -> None:
    output, cut = ids(tok, ANSWER), 12
    expected = tok.decode(output[output.index(tok.convert_tokens_to_ids("<|message|>")) + 1:cut])
    choice = chat(client, "answer", max_tokens=cut).choices[0]
    assert choice.finish_reason == "length"
    assert (choice.message.model_extra["reasoning_content"], choice.message.content) == (expected, None)
    chunks = list(chat(client, "answer", max_tokens=cut, stream=True))  # (the SDK's helper raises at "length")
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == expected
    assert not any(c.choices[0].delta.content for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_include_reasoning_false_drops_it(client: openai.OpenAI) -> None:
    for completion in (chat(client, "answer", extra_body={"include_reasoning": False}),
                       streamed(client, "answer", extra_body={"include_reasoning": False})):
        message = completion.choices[0].message
        assert message.content == REPLY and message.model_extra.get("reasoning_content") is None


@pytest.mark.parametrize(("effort", "level"), [(None, "medium"), ("low", "low"), ("high", "high")])
def test_reasoning_effort_reaches_the_template(client: openai.OpenAI, effort: str | None, level: str) -> None:
    extra = {} if effort is None else {"reasoning_effort": effort}
    assert chat(client, "effort", **extra).choices[0].message.content == level


@pytest.mark.parametrize(("effort", "message"), [
    ("max", "reasoning_effort='max' is not supported by Harmony. Supported values are: high, medium, low."),
    ("extreme", "Invalid value for `reasoning_effort`"),
])
def test_reasoning_effort_harmony_has_no_words_for_is_a_400(server: LiveServer, effort: str, message: str) -> None:
    body = {"model": MODEL_NAMES[0], "messages": [{"role": "user", "content": "answer"}], "reasoning_effort": effort}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["message"].startswith(message) and error["param"] == "reasoning_effort"


# ---- a gpt-oss model without the harmony flags, and another model ------------------------------------------------


def bare_server(tok: Any, model_type: str) -> Iterator[openai.OpenAI]:
    """No parser flags; the engine stops only at the tokenizer's EOS (<|return|>): a checkpoint without gpt-oss's
    generation config."""
    ctx = make_context(scripted_engine(tok, eos=("<|return|>",), model_type=model_type))
    with LiveServer(ctx) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)
    assert pool_is_free(ctx.engine)


@pytest.fixture(scope="module")
def gpt_oss_client(tok: Any) -> Iterator[openai.OpenAI]:
    yield from bare_server(tok, "gpt_oss")


@pytest.fixture(scope="module")
def llama_client(tok: Any) -> Iterator[openai.OpenAI]:
    yield from bare_server(tok, "llama")


def test_gpt_oss_without_flags_reads_harmony(gpt_oss_client: openai.OpenAI) -> None:
    for completion in (chat(gpt_oss_client, "answer"), streamed(gpt_oss_client, "answer")):
        choice = completion.choices[0]
        assert choice.message.model_extra["reasoning_content"] == choice.message.model_extra["reasoning"] == THOUGHT
        assert (choice.message.content, choice.finish_reason) == (REPLY, "stop")
    # No reasoning parser named: no count of its tokens (vLLM's, too).
    assert chat(gpt_oss_client, "answer").usage.completion_tokens_details is None


def test_gpt_oss_without_flags_takes_tools_and_stops_at_the_call(gpt_oss_client: openai.OpenAI, tok: Any) -> None:
    """tool_choice "auto" needs no tool flags for gpt-oss (vLLM's); with no tool parser the call is dropped. The
    reply ends at <|call|>, a stop vLLM adds to gpt-oss's chat requests, though the engine's EOS is <|return|>."""
    for ask in (chat, streamed):
        choice = ask(gpt_oss_client, "call", tools=[WEATHER]).choices[0]
        assert choice.finish_reason == "stop" and not choice.message.content and not choice.message.tool_calls
        assert choice.message.model_extra["reasoning_content"] == "Need to use function get_weather."
    completion = chat(gpt_oss_client, "call", extra_body={"stop_token_ids": [7]})
    assert completion.choices[0].model_extra["stop_reason"] == tok.convert_tokens_to_ids("<|call|>")
    assert completion.usage.completion_tokens == len(ids(tok, CALL))


def test_another_model_without_flags_is_plain_content(llama_client: openai.OpenAI, tok: Any) -> None:
    choice = chat(llama_client, "answer").choices[0]
    assert choice.message.content == tok.decode(ids(tok, ANSWER), skip_special_tokens=True)
    assert choice.message.model_extra.get("reasoning_content") is None
    completion = chat(llama_client, "call")  # on past <|call|>, to the EOS the script writes next
    assert completion.choices[0].model_extra["stop_reason"] is None
    assert completion.usage.completion_tokens == len(ids(tok, CALL)) + 1
    with pytest.raises(openai.BadRequestError, match='"auto" tool choice requires --enable-auto-tool-choice'):
        chat(llama_client, "answer", tools=[WEATHER])
