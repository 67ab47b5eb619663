"""jaxllm.generation_config: vLLM's --generation-config auto / vllm / <dir>."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from jaxllm import generation_config as gc
from jaxllm.config import DEFAULT_MODEL
from jaxllm.sampling_params import SamplingParams

# A Qwen2.5-Instruct-style generation_config.json.
QWEN_STYLE = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "max_new_tokens": 2048,
}


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which warnings were already logged, so each test sees its own."""
    monkeypatch.setattr(gc, "_warned", set())


def model_dir(root: Path, generation: dict | None) -> Path:
    """A model directory: the embedded model's config.json plus the given generation_config.json."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(DEFAULT_MODEL) / "config.json", root)
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def test_auto_reads_the_model_file(tmp_path, fresh_warnings, caplog):
    model = model_dir(tmp_path / "qwen_like", QWEN_STYLE)
    with caplog.at_level(logging.WARNING, logger=gc.__name__):
        defaults = gc.load_generation_defaults(model)
    assert defaults.sampling == {
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_tokens": 2048,
    }  # fmt: skip
    assert defaults.eos_token_ids == [151645, 151643]
    assert defaults.source == "model"
    assert [r.getMessage() for r in caplog.records] == [gc.OVERRIDE_WARNING]
    assert "--generation-config vllm" in gc.OVERRIDE_WARNING
    # The defaults are valid SamplingParams keywords.
    params = SamplingParams(**defaults.sampling)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.7, 20, 2048)


def test_the_warning_is_logged_once(tmp_path, fresh_warnings, caplog):
    model = model_dir(tmp_path / "m", QWEN_STYLE)
    with caplog.at_level(logging.WARNING, logger=gc.__name__):
        gc.load_generation_defaults(model)
        gc.load_generation_defaults(model)
    assert len(caplog.records) == 1


def test_vllm_ignores_the_file_but_keeps_its_eos_ids(tmp_path, fresh_warnings, caplog):
    model = model_dir(tmp_path / "m", QWEN_STYLE)
    with caplog.at_level(logging.WARNING, logger=gc.__name__):
        defaults = gc.load_generation_defaults(model, "vllm")
    assert defaults.sampling == {}
    assert defaults.eos_token_ids == [151645, 151643]
    assert defaults.source == "vllm"
    assert caplog.records == []


def test_a_directory_supplies_the_defaults(tmp_path):
    model = model_dir(tmp_path / "model", {"eos_token_id": 2})
    other = model_dir(tmp_path / "other", {"temperature": 0.6, "top_p": 0.9, "eos_token_id": 7})
    defaults = gc.load_generation_defaults(model, str(other))
    assert defaults.sampling == {"temperature": 0.6, "top_p": 0.9}
    assert defaults.eos_token_ids == [7]
    assert defaults.source == str(other)


def test_an_unknown_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="directory holding generation_config.json"):
        gc.load_generation_defaults(DEFAULT_MODEL, str(tmp_path / "does_not_exist"))
    with pytest.raises(ValueError, match="'auto', 'vllm'"):
        gc.load_generation_defaults(DEFAULT_MODEL, str(tmp_path))  # exists, but holds no file


def test_embedded_model_stops_on_eos_and_bos_without_overrides():
    defaults = gc.load_generation_defaults(DEFAULT_MODEL)
    assert defaults.sampling == {}  # its file only says do_sample=false, which vLLM does not read
    assert defaults.eos_token_ids == [2, 1]


def test_without_a_file_the_ids_come_from_config_json(tmp_path):
    model = model_dir(tmp_path / "bare", None)
    assert gc.load_generation_defaults(model).eos_token_ids == [2]  # config.json's eos_token_id
    assert gc.load_generation_defaults(tmp_path / "missing") == gc.GenerationDefaults()


def test_unset_and_unrelated_keys_give_no_overrides():
    assert gc.sampling_overrides({"temperature": None, "do_sample": True, "num_beams": 4}) == {}
    assert gc.sampling_overrides({"min_p": 0.05}) == {"min_p": 0.05}
    assert gc.eos_token_ids({"eos_token_id": 5}) == [5]
    assert gc.eos_token_ids({}) == []
