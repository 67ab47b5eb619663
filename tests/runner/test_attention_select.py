"""Which attention the runner picks: the Pallas kernel on a GPU when the model fits it (auto),
otherwise the XLA path with the reason logged; forcing the kernel where it cannot run is an error."""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import pytest

from jaxllm.model_arch import ModelArch
from jaxllm.models.sharding import make_mesh, rules_for
from jaxllm.runner import attention

ARCH = ModelArch(
    architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512,
    num_layers=2,
    num_heads=8, num_kv_heads=2, head_dim=128, norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
    max_position_embeddings=512, tie_word_embeddings=False,
)


def test_kernel_fits_bf16_and_fp16_llama_shapes_on_a_gpu() -> None:
    for dtype in (jnp.bfloat16, jnp.float16):
        assert attention.pallas_unsupported_reason("gpu", ARCH, dtype, 16, 1) is None
    glm4_9b = dataclasses.replace(ARCH, num_heads=32, num_kv_heads=2)  # GQA 16: tp=1 and tp=2 keep it
    for tp in (1, 2):
        assert attention.pallas_unsupported_reason("gpu", glm4_9b, jnp.bfloat16, 16, tp) is None


@pytest.mark.parametrize(
    ("arch", "dtype", "page", "words"),
    [
        (ARCH, jnp.float32, 16, "float32"),
        (dataclasses.replace(ARCH, head_dim=96), jnp.bfloat16, 16, "head_dim 96"),
        (ARCH, jnp.bfloat16, 8, "page_size 8"),
        (dataclasses.replace(ARCH, num_heads=24, num_kv_heads=2), jnp.bfloat16, 16, "group 12"),
    ],
)
def test_reasons_the_kernel_cannot_serve_a_model(arch, dtype, page, words) -> None:
    reason = attention.pallas_unsupported_reason("gpu", arch, dtype, page, 1)
    assert reason is not None and words in reason


def test_auto_on_cpu_is_the_xla_path_with_the_reason_logged(caplog) -> None:
    mesh = make_mesh(1)
    with caplog.at_level(logging.INFO, logger=attention.logger.name):
        _, name = attention.select_attention("auto", ARCH, jnp.bfloat16, 16, mesh, rules_for(ARCH, 1))
    assert name == "xla"
    assert "not cpu" in caplog.text


def test_forcing_the_kernel_where_it_cannot_run_is_a_clear_error() -> None:
    mesh = make_mesh(1)
    with pytest.raises(ValueError, match="--attention-backend pallas cannot run this model: .*cpu"):
        attention.select_attention("pallas", ARCH, jnp.bfloat16, 16, mesh, rules_for(ARCH, 1))


def test_kernel_sharded_over_kv_heads_lowers_for_cuda() -> None:
    """tp=2: the Mosaic kernel runs per shard under shard_map (2 of 4 KV heads, 4 of 8 query heads
    each), and the whole lowers for a GPU from this CPU machine."""
    import jax

    from jaxllm.models.sharding import ShardingRules
    from pallas_kernels.ragged_paged_attention.mosaic_gpu import ragged_paged_attention_mosaic
    from tests.kernels.test_mosaic_gpu_attention import Case, make_batch

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    case = Case(q_lens=(1, 40), kv_lens=(300, 200), num_q_heads=8, num_kv_heads=4, head_dim=128, pages_per_seq=19)
    sharded = attention.shard_over_heads(ragged_paged_attention_mosaic, make_mesh(2), ShardingRules())
    fn = jax.jit(lambda *batch: sharded(*batch, case.params))
    text = fn.trace(*make_batch(case)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "num_partitions = 2" in text
