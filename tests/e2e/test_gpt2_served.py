"""`python -m jaxllm.serve` on a GPT-2-shaped tiny checkpoint with the real GPT-2 tokenizer: the openai
SDK's completions and chat (GPT-2 has no chat template; --chat-template gives one)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests.fixtures import fixture_tokenizer
from tests.models.hf_tiny import make_checkpoint
from tests.serve.test_process import ServerProcess, started

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    model_dir = make_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2-served"), vocab_size=50257,
                                bos_token_id=50256, eos_token_id=50256)
    for file in fixture_tokenizer("gpt2").iterdir():
        shutil.copy(file, model_dir / file.name)
    (model_dir / "template.jinja").write_text(TEMPLATE)
    return model_dir


@pytest.fixture(scope="module")
def server(gpt2_dir: Path) -> Iterator[ServerProcess]:
    with started("jaxllm.serve", "--model", str(gpt2_dir), "--served-model-name", "gpt2-tiny", "--chat-template",
                 str(gpt2_dir / "template.jinja"), "--dtype", "float32", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "64", "--disable-log-stats") as server:
        yield server


@pytest.mark.slow
def test_gpt2_completions_and_chat_through_the_openai_sdk(server: ServerProcess, gpt2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    [model] = client.models.list().data
    assert (model.id, model.max_model_len) == ("gpt2-tiny", 512)  # n_positions is the context limit

    out = client.completions.create(model="gpt2-tiny", prompt="Hello, world!", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.usage.prompt_tokens == 4  # [15496, 11, 995, 0]: GPT-2's BPE, no BOS
    choice = out.choices[0]
    assert out.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(choice.token_ids)

    rendered = tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
    full = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.usage.prompt_tokens == len(tokenizer(rendered)["input_ids"])
    stream = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == full.choices[0].message.content and streamed
    # The same prompt as a completion continues the same way (greedy): the template really rendered it.
    same = client.completions.create(model="gpt2-tiny", prompt=rendered, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert same.choices[0].text == streamed
