"""Tiny random checkpoints of each supported family, written by transformers (torch, CPU).

Weights are drawn N(0, 0.2) everywhere (biases and norm weights included, so they are not
trivially 0 / 1), then saved with `save_pretrained` as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    # GQA + llama3 rope scaling (original context small so the scaling bites within 400 tokens).
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            tie_word_embeddings=False,
        ),
    ),
    # Sliding window shorter than the prompt.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(rope_theta=10000.0, sliding_window=96, tie_word_embeddings=False)),
    # q/k/v bias, tied embeddings.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # per-head q/k RMSNorm.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False)),
    # Interleaved RoPE over half of each head, q/k/v bias, HF-fused gate_up_proj.
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM,
            dict(partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=[1, 2])),
    # GLM plus the post-attention and post-MLP norms.
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM,
             dict(partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=[1, 2])),
    # Mistral with a top-2 of 4 experts MoE in every layer (softmax, top-k, renormalised).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False)),
    # Qwen3 with top-3 of 8 experts (no renormalisation) in layer 0, a dense MLP in layer 1 (mlp_only_layers).
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                       decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False)),
    # Sinks, a 96-token window on layer 0 (shorter than the prompt), YaRN, biased top-2 of 4 router, clamped SwiGLU.
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=96,
                     layer_types=["sliding_attention", "full_attention"], attention_bias=True, swiglu_limit=7.0,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)),
    # MLA without q_lora_rank, YaRN with DeepSeek's mscale, layer 0 dense, then 2 of 8 routed experts (softmax,
    # group-limited: the best 2 of 4 groups) plus a shared expert, weights scaled by 1.5.
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                    dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "mscale": 0.707,
                                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 64},
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)),
    # MLA with q_lora_rank, sigmoid scoring with a correction bias over groups (noaux_tc), renormalised, x2.5.
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                         norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)),
    # Learned positions, LayerNorm with bias, Conv1D weights, GELU (tanh), tied head; its own config names.
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=320, n_embd=64, n_head=4, n_layer=2, n_inner=96, n_positions=512,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2)),
}


def make_checkpoint(family: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    config_cls, model_cls, extra = FAMILIES[family]
    common = {} if family == "gpt2" else COMMON
    config = config_cls(**{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias is a buffer
                buffer.normal_(0.0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def hf_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()
