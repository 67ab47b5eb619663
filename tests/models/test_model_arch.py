"""Config readers and RoPE variants against transformers' own (no model is built)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxllm.model_arch import ARCHITECTURES, UnsupportedModelError, arch_from_hf_config
from jaxllm.models.layers import rope_inv_freq

GLM4_TF4 = {  # GLM-4-9B-0414's config.json, as transformers 4 wrote it
    "architectures": ["Glm4ForCausalLM"], "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "attention_bias": True,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338],
}


def test_transformers_4_and_5_rope_fields_read_the_same():
    tf5 = {k: v for k, v in GLM4_TF4.items() if k not in ("partial_rotary_factor", "rope_theta")}
    tf5 |= {"rope_theta": None, "partial_rotary_factor": None,  # transformers 5 writes the old keys as null
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    old, new = arch_from_hf_config(GLM4_TF4), arch_from_hf_config(tf5)
    assert old == new
    assert (old.family, old.rotary_dim, old.rope_interleaved, old.post_sublayer_norms, old.qkv_bias) == (
        "glm4", 64, True, True, True)
    assert old.num_heads // old.num_kv_heads == 16


def test_gpt2_reads_its_own_names():
    arch = arch_from_hf_config(transformers.GPT2Config().to_dict() | {"architectures": ["GPT2LMHeadModel"]})
    assert (arch.family, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.num_layers) == (
        "gpt2", 768, 12, 12, 12)
    assert (arch.intermediate_size, arch.context_limit, arch.tie_word_embeddings, arch.hidden_act) == (
        3072, 1024, True, "gelu_new")


def test_unsupported_names_list_every_supported_architecture():
    with pytest.raises(UnsupportedModelError) as err:
        arch_from_hf_config({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    assert "FalconForCausalLM" in str(err.value)
    assert all(name in str(err.value) for name in ARCHITECTURES)
    with pytest.raises(UnsupportedModelError, match="longrope"):
        arch_from_hf_config({**GLM4_TF4, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})


ROPES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 1.0),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}, 1.0),
    # gpt-oss's: no truncation of the correction range.
    "yarn": ({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
              "original_max_position_embeddings": 4096}, 1.0),
    # DeepSeek's mscale pair, on half of each head.
    "yarn-mscale-partial": ({"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 4096}, 0.5),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_frequencies_match_transformers(name):
    scaling, partial = ROPES[name]
    config = transformers.LlamaConfig(
        hidden_size=1024, num_attention_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_parameters={"rope_theta": 150000.0, "partial_rotary_factor": partial, **scaling},
    )
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, torch.device("cpu"))
    arch = arch_from_hf_config(config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    freq, factor = rope_inv_freq(arch)
    np.testing.assert_allclose(freq, want_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-6)
    if scaling["rope_type"] == "yarn":
        assert arch.context_limit == int(4096 * scaling["factor"])
