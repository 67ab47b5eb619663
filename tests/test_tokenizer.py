"""jaxllm.tokenizer on real tokenizers: chat formats, content parts, templates, byte-fallback round-trips.

Expected ids come from each fixture's SOURCE.md (checked there against tiktoken / sentencepiece /
the official Qwen tokenizer), not from this code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxllm.config import DEFAULT_MODEL
from jaxllm.tokenizer import (
    apply_chat_template,
    detect_content_format,
    encode_prompt,
    load_tokenizer,
    resolve_chat_template,
    starts_with_bos,
)
from tests.fixtures import fixture_tokenizer

HI = [{"role": "user", "content": "Hi"}]
MULTIBYTE_TEXTS = [
    "你好，世界",  # CJK
    "🦙🚀 emoji",  # 4-byte UTF-8
    "Crème brûlée à la française",  # accented Latin
    "naïve café — Ωmega; tab\there\nnew line",
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(fixture_tokenizer("llama3"))


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(fixture_tokenizer("qwen2.5"))


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(fixture_tokenizer("llama2"))


@pytest.fixture(scope="module")
def stories():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def stories_without_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the embedded model's tokenizer files with the chat template removed."""
    target = tmp_path_factory.mktemp("no_template")
    shutil.copy(Path(DEFAULT_MODEL) / "tokenizer.json", target)
    config = json.loads((Path(DEFAULT_MODEL) / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


# --- chat formats of real models --------------------------------------------------------------


def test_llama3_header_format_with_generation_prompt(llama3):
    text = apply_chat_template(llama3, HI)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = encode_prompt(llama3, text, add_special_tokens=False)
    assert ids == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271]
    # The template wrote BOS: tokenizing as a completion would double it.
    assert starts_with_bos(llama3, text)
    assert encode_prompt(llama3, text, add_special_tokens=True)[:2] == [128000, 128000]


def test_llama3_without_generation_prompt_and_continuing_the_final_message(llama3):
    assert apply_chat_template(llama3, HI, add_generation_prompt=False).endswith("Hi<|eot_id|>")
    prefill = HI + [{"role": "assistant", "content": "Sure, here"}]
    text = apply_chat_template(llama3, prefill, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure, here")
    with pytest.raises(ValueError, match="continue_final_message"):
        apply_chat_template(llama3, prefill, add_generation_prompt=True, continue_final_message=True)


def test_qwen_chatml_known_ids(qwen):
    text = apply_chat_template(qwen, HI)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert encode_prompt(qwen, text, add_special_tokens=False) == [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
        10950, 17847, 13, 151645, 198, 151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198,
    ]  # fmt: skip
    assert not starts_with_bos(qwen, text)  # Qwen has no BOS at all


def test_qwen_renders_tools_into_the_system_prompt(qwen):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    text = apply_chat_template(qwen, [{"role": "user", "content": "Weather in Paris?"}], tools=[tool])
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(tools_block) == tool
    assert "<tool_call>" in text and text.endswith("<|im_start|>assistant\n")


def test_llama2_inst_format(llama2):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    text = apply_chat_template(llama2, messages)
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? [/INST]"
    ids = encode_prompt(llama2, text, add_special_tokens=False)
    assert ids[:4] == [1, 518, 25580, 29962]  # <s> ▁[ INST ]
    assert ids.count(1) == 2 and ids.count(2) == 1  # one <s> per turn, one </s> after the answer


# --- content given as a list of parts -----------------------------------------------------------


def test_text_parts_are_joined_with_newlines_for_string_templates(llama3):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    as_parts = apply_chat_template(llama3, [{"role": "user", "content": parts}])
    assert as_parts == apply_chat_template(llama3, [{"role": "user", "content": "Hello\nworld"}])


def test_templates_that_loop_over_content_get_the_parts(stories):
    template = "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}"
    assert detect_content_format(template) == "openai"
    tokenizer = stories
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "plain"}]
    assert apply_chat_template(tokenizer, messages, chat_template=template) == "[Hello][world][plain]"


def test_real_templates_read_content_as_a_string(llama3, qwen, llama2, stories):
    for tokenizer in (llama3, qwen, llama2, stories):
        assert detect_content_format(tokenizer.chat_template) == "string"
    aliased = "{% set msgs = messages %}{% for m in msgs %}{% for p in m.content | list %}{{ p.text }}{% endfor %}"
    aliased += "{% endfor %}"
    assert detect_content_format(aliased.replace("m.content", "other.content")) == "string"
    assert detect_content_format(aliased) == "openai"


def test_non_text_parts_are_rejected(llama3):
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    with pytest.raises(ValueError, match="image_url"):
        apply_chat_template(llama3, [{"role": "user", "content": [image]}])


# --- templates: missing, from a file, inline ------------------------------------------------------


def test_missing_template_is_a_clear_error(stories_without_template):
    tokenizer = load_tokenizer(stories_without_template)
    with pytest.raises(ValueError, match="has no chat template; pass --chat-template"):
        apply_chat_template(tokenizer, HI)
    assert apply_chat_template(tokenizer, HI, chat_template="<{{ messages[0]['content'] }}>") == "<Hi>"


def test_chat_template_from_a_file(tmp_path, stories_without_template):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}é", encoding="utf-8")
    template = resolve_chat_template(str(path))
    assert template == path.read_text(encoding="utf-8")
    assert resolve_chat_template(path) == template
    tokenizer = load_tokenizer(stories_without_template)
    assert apply_chat_template(tokenizer, HI, chat_template=template) == "user: Hi\né"


def test_inline_chat_template_and_its_escapes(stories_without_template):
    # As typed on a shell line: a literal backslash-n, which vLLM interprets as a newline.
    inline = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\\n{% endfor %}{{ greeting }} — ü"
    template = resolve_chat_template(inline)
    assert template == "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}{{ greeting }} — ü"
    tokenizer = load_tokenizer(stories_without_template)
    text = apply_chat_template(tokenizer, HI, chat_template=template, chat_template_kwargs={"greeting": "Bye"})
    assert text == "<s>Hi\nBye — ü"
    assert resolve_chat_template(None) is None


def test_a_missing_template_file_is_an_error():
    with pytest.raises(ValueError, match="looks like a file path"):
        resolve_chat_template("templates/missing_template.jinja")


# --- the embedded model ---------------------------------------------------------------------------


def test_embedded_model_chat_prompt_has_exactly_one_bos(stories):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Once upon a time "},
        {"role": "assistant", "content": "there was a cat."},
        {"role": "user", "content": [{"type": "text", "text": "The cat"}]},
    ]
    text = apply_chat_template(stories, messages)
    assert text == "<s>Once upon a time there was a cat. The cat"
    ids = encode_prompt(stories, text, add_special_tokens=False)
    assert ids[0] == stories.bos_token_id == 1 and ids.count(1) == 1
    # The same ids as the completion prompt, where the post-processor adds BOS.
    plain = "Once upon a time there was a cat. The cat"
    assert ids == encode_prompt(stories, plain, add_special_tokens=True)
    # SOURCE.md's example
    assert encode_prompt(stories, apply_chat_template(stories, [{"role": "user", "content": "Once upon a time"}]),
                         add_special_tokens=False) == [1, 403, 407, 261, 378]


# --- byte fallback and multibyte round-trips -------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "stories"])
def test_multibyte_text_round_trips(name, llama2, stories):
    tokenizer = {"llama2": llama2, "stories": stories}[name]
    for text in MULTIBYTE_TEXTS:
        ids = encode_prompt(tokenizer, text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # Characters outside the vocabulary are spelled as UTF-8 byte tokens, not <unk>.
    emoji_ids = encode_prompt(tokenizer, "🦙", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(emoji_ids)
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert tokenizer.unk_token_id not in emoji_ids


def test_stories_spells_cjk_with_bytes(stories):
    pieces = stories.convert_ids_to_tokens(encode_prompt(stories, "你好", add_special_tokens=False))
    assert pieces == ["▁", "<0xE4>", "<0xBD>", "<0xA0>", "<0xE5>", "<0xA5>", "<0xBD>"]


# --- loading ----------------------------------------------------------------------------------------


def test_load_tokenizer_is_fast_and_offline(tmp_path):
    assert load_tokenizer(DEFAULT_MODEL).is_fast
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match="jaxllm does not download"):
        load_tokenizer("jaxllm-tests/not-in-the-hf-cache")


def test_golden_output_decodes_to_its_text(stories):
    golden = json.loads((Path(__file__).parent / "golden" / "stories260K_greedy.json").read_text(encoding="utf-8"))
    ids = golden["output_token_ids"]
    assert len(ids) == golden["num_output_tokens"] <= golden["max_new_tokens"]
    assert stories.decode(ids, skip_special_tokens=True) == golden["text"]
    assert golden["text"].startswith("Once upon a time, there was a little girl named Lily.")
    assert [top[0][0] for top in golden["output_top_logprobs"]] == ids  # greedy: each token is the argmax
