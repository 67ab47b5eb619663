"""Checkpoint loading: formats, dtypes, sharded indexes, the HF cache, dummy weights, clear errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jaxllm.config import ModelConfig, ParallelConfig
from jaxllm.model_arch import ARCHITECTURES, UnsupportedModelError
from jaxllm.models.loader import WeightLoadError, resolve_model_dir
from jaxllm.runner.model_loading import load_model
from tests.models.hf_tiny import make_checkpoint
from tests.paged import PagedRunner

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint("llama3", tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def reference_logits(llama_dir):
    loaded = load_model(ModelConfig(model=str(llama_dir), dtype="float32"), ParallelConfig())
    return PagedRunner(loaded, "xla").run(PROMPT, [40], 0)[0]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_index_loads_the_same(llama_dir, reference_logits, tmp_path):
    d = _copy(llama_dir, tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, d / file)
        weight_map.update({n: file for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_model(ModelConfig(model=str(d), dtype="float32"), ParallelConfig())
    np.testing.assert_allclose(PagedRunner(loaded, "xla").run(PROMPT, [40], 0)[0], reference_logits, atol=1e-5)


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(llama_dir, reference_logits, tmp_path, torch_dtype):
    d = _copy(llama_dir, tmp_path / "half")
    tensors = load_file(d / "model.safetensors")
    save_file({n: t.to(torch_dtype) for n, t in tensors.items()}, d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    (d / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(ModelConfig(model=str(d), dtype="auto"), ParallelConfig())
    assert loaded.dtype == jnp.dtype(cfg["torch_dtype"])  # auto keeps the checkpoint's half dtype
    assert all(x.dtype == loaded.dtype for x in loaded.leaves)
    # Upcast to float32: only the checkpoint's rounding separates it from the fp32 logits.
    loaded32 = load_model(ModelConfig(model=str(d), dtype="float32"), ParallelConfig())
    out = PagedRunner(loaded32, "xla").run(PROMPT, [40], 0)[0]
    assert np.abs(out - reference_logits).max() < 0.1 * np.abs(reference_logits).max()


def test_dummy_weights_for_any_config(tmp_path, llama_dir):
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d / "config.json")
    loaded = load_model(ModelConfig(model=str(d), load_format="dummy", dtype="bfloat16"), ParallelConfig())
    assert all(x.dtype == jnp.bfloat16 for x in loaded.leaves)
    logits = PagedRunner(loaded, "xla").run(PROMPT[:8], [8], 1)[0]
    assert np.isfinite(logits).all()


def test_missing_weights_file_is_a_clear_error(tmp_path, llama_dir):
    d = tmp_path / "nofile"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(ModelConfig(model=str(d)), ParallelConfig())


def test_missing_model_dir_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a local directory nor in the local Hugging Face cache"):
        resolve_model_dir("no-such-org/no-such-model")


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "falcon")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    supported = ".*".join(ARCHITECTURES)
    with pytest.raises(UnsupportedModelError, match=f"FalconForCausalLM.*{supported}"):
        load_model(ModelConfig(model=str(d)), ParallelConfig())


def test_wrong_tensor_shape_names_the_tensor(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :10].contiguous()
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(WeightLoadError, match=f"{name} has shape \\(96, 10\\).*expected \\(96, 64\\)"):
        load_model(ModelConfig(model=str(d)), ParallelConfig())


def test_model_id_from_local_hf_cache(tmp_path, llama_dir, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(llama_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("acme/tiny-llama") == snapshot
    assert resolve_model_dir("acme/tiny-llama", revision=commit) == snapshot
