"""The official `openai` SDK (sync, async, streaming) against the server over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.serve.conftest import API_KEY, MODEL_NAMES, STORY, LiveServer, pool_is_free, wait_until


@pytest.fixture()
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture()
def async_client(live: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)


def story_continuation(tokenizer: Any, prompt_ids: list[int], script: list[int], n: int) -> str:
    """What the fake model writes after `prompt_ids` (greedy): script[(len(context)) % len(script)]..."""
    ids = [script[(len(prompt_ids) + k) % len(script)] for k in range(n)]
    full = tokenizer.decode(prompt_ids + ids)
    return full[len(tokenizer.decode(prompt_ids)):]


def test_models_lists_every_served_name_with_max_model_len(client: openai.OpenAI, live: LiveServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == MODEL_NAMES
    assert all(m.model_extra["max_model_len"] == live.ctx.engine.info.max_model_len for m in models.data)
    assert client.models.retrieve(MODEL_NAMES[1]).id == MODEL_NAMES[1]


def test_completion_text_usage_and_ids(client: openai.OpenAI, live: LiveServer, stories_tokenizer: Any,
                                       story_script: list[int]) -> None:
    out = client.completions.create(model=MODEL_NAMES[0], prompt="Once upon a time", max_tokens=7, temperature=0)
    prompt_ids = stories_tokenizer.encode("Once upon a time")  # with BOS, as completions add it
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL_NAMES[0]
    choice = out.choices[0]
    assert choice.text == story_continuation(stories_tokenizer, prompt_ids, story_script, 7)
    assert choice.finish_reason == "length" and choice.model_extra["stop_reason"] is None
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 7
    assert out.usage.total_tokens == len(prompt_ids) + 7
    assert out.usage.prompt_tokens_details is None  # vLLM's: only with --enable-prompt-tokens-details


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAMES[1], prompt="Lily")
    assert out.usage.completion_tokens == 16 and out.model == MODEL_NAMES[0]  # the first name is reported


def test_completion_prompt_forms_n_and_echo(client: openai.OpenAI, stories_tokenizer: Any) -> None:
    ids = stories_tokenizer.encode("The dog")
    out = client.completions.create(model=MODEL_NAMES[0], prompt=[ids, ids[:2]], max_tokens=3, n=2, echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(stories_tokenizer.decode(ids)) for c in out.choices[:2])
    assert out.usage.prompt_tokens == len(ids) + 2 and out.usage.completion_tokens == 12
    texts = client.completions.create(model=MODEL_NAMES[0], prompt=["a", "b", "c"], max_tokens=2)
    assert len(texts.choices) == 3


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAMES[0], prompt="Lily", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_extra_body_sampling_fields(client: openai.OpenAI, stories_tokenizer: Any) -> None:
    stop_word = STORY.split()[3]  # "time,"
    out = client.completions.create(
        model=MODEL_NAMES[0], prompt="Once", max_tokens=40, stop=[stop_word],
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 1,
                    "skip_special_tokens": True, "include_stop_str_in_output": True},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop_word
    assert choice.text.endswith(stop_word)
    stop_id = stories_tokenizer.encode(" there", add_special_tokens=False)[-1]
    out = client.completions.create(model=MODEL_NAMES[0], prompt="Once", max_tokens=40,
                                    extra_body={"stop_token_ids": [stop_id]})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == stop_id


def test_chat_message_and_usage(client: openai.OpenAI, stories_tokenizer: Any, story_script: list[int]) -> None:
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Once upon a time"}]
    out = client.chat.completions.create(model=MODEL_NAMES[0], messages=messages, max_completion_tokens=6, seed=3,
                                         temperature=0)
    prompt_ids = stories_tokenizer.encode("Once upon a time")  # the template drops system, writes BOS
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == story_continuation(stories_tokenizer, prompt_ids, story_script, 6)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 6


def test_chat_default_max_tokens_is_the_rest_of_the_context(client: openai.OpenAI, live: LiveServer) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAMES[0], messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == live.ctx.engine.info.max_model_len


def test_chat_logprobs_n_and_extra_body(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAMES[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2, logprobs=True,
        top_logprobs=2, extra_body={"chat_template_kwargs": {"unused": 1}, "add_generation_prompt": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(item.top_logprobs) == 2 for item in content)
    assert all(item.bytes == list(item.token.encode()) for item in content)


def test_chat_continue_final_message_echo(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAMES[0], max_tokens=2,
        messages=[{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once upon"}],
        extra_body={"add_generation_prompt": False, "continue_final_message": True, "echo": True},
    )
    assert out.choices[0].message.content.startswith("Once upon")


def test_chat_streaming_sync_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAMES[0], messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True},
                                            temperature=0)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    full = client.chat.completions.create(model=MODEL_NAMES[0], messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def test_completion_streaming_continuous_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL_NAMES[0], prompt="Lily", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    assert [c.usage.completion_tokens for c in chunks[:-1]] == sorted(c.usage.completion_tokens for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


def test_async_client_concurrent_requests(async_client: openai.AsyncOpenAI, live: LiveServer) -> None:
    async def one(i: int) -> str:
        if i % 2:
            out = await async_client.completions.create(model=MODEL_NAMES[0], prompt=f"Story {i}", max_tokens=5)
            return out.choices[0].text
        stream = await async_client.chat.completions.create(
            model=MODEL_NAMES[0], messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=5, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with async_client:
            return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)
    wait_until(lambda: pool_is_free(live.ctx.engine))
