"""Choose the attention implementation: the Pallas kernel on a GPU when the model fits it,
otherwise the XLA path; a flag forces either (forcing the kernel on a model it cannot run is an
error that says why).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxllm.model_arch import ModelArch
from jaxllm.models.layers import AttentionFn
from jaxllm.models.sharding import ShardingRules
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference, ragged_paged_attention_xla

logger = logging.getLogger(__name__)


class Attention(NamedTuple):
    fn: AttentionFn
    name: str  # "pallas", "xla" or "reference"


def pallas_unsupported_reason(platform: str, arch: ModelArch, dtype, page_size: int, tp: int) -> str | None:
    """Why the Mosaic GPU kernel cannot serve this model here (None: it can)."""
    if platform != "gpu":
        return f"the Pallas kernel targets NVIDIA Hopper GPUs, not {platform}"
    try:
        from pallas_kernels.ragged_paged_attention import mosaic_gpu
    except ImportError as exc:  # kernel module not available in this build
        return f"the Mosaic GPU kernel is unavailable ({exc})"
    return mosaic_gpu.mosaic_unsupported_reason(
        dtype=dtype,
        head_dim=arch.head_dim,
        num_q_heads=arch.num_heads // tp,
        num_kv_heads=max(arch.num_kv_heads // tp, 1),
        page_size=page_size,
    )


def shard_over_heads(kernel: AttentionFn, mesh: Mesh, rules: ShardingRules) -> AttentionFn:
    """Run a per-device kernel under shard_map: q by query heads, KV pages by KV heads, the
    optional `sinks` [Hq] by query heads."""
    q_spec = PartitionSpec(None, rules.q_heads, None)
    kv_spec = PartitionSpec(None, rules.kv_heads, None, None, None)
    sink_spec = PartitionSpec(rules.q_heads)
    meta = PartitionSpec()

    def sharded(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, params, *, sinks=None):
        args = [q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs]
        in_specs = [q_spec, kv_spec, meta, meta, meta, meta]
        if sinks is not None:  # passed on only when given: a model without sinks runs the same program
            args.append(sinks)
            in_specs.append(sink_spec)

        def per_device(*a):
            return kernel(*a[:6], params, sinks=a[6] if len(a) > 6 else None)

        fn = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(in_specs), out_specs=q_spec, check_vma=False)
        return fn(*args)

    return sharded


def select_attention(
    backend: str, arch: ModelArch, dtype, page_size: int, mesh: Mesh, rules: ShardingRules
) -> Attention:
    """The attention function and the name of its implementation: `fn(q, kv_pages, kv_lens,
    page_indices, cu_q_lens, num_seqs, params, sinks=None)` (common.py's contract).

    NOTE: the function is wrapped in its own `jax.jit` (params static), so all layers share one
    traced and lowered attention instead of one copy per layer: each layer's copy would embed the
    Mosaic kernel again, and the lowered module and its lowering time would grow with the layers.
    """
    if arch.mla is not None:
        fn, name = _select_mla(backend, arch, dtype, page_size, mesh, rules)
        return Attention(jax.jit(fn, static_argnums=(7,)), name)
    fn, name = _select(backend, arch, dtype, page_size, mesh, rules)
    return Attention(jax.jit(fn, static_argnums=(6,)), name)


def _select_mla(backend: str, arch: ModelArch, dtype, page_size: int, mesh: Mesh, rules: ShardingRules):
    """MLA (DeepSeek): `fn(q_latent, q_pe, latent_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
    sm_scale)` in the absorbed form (pallas_kernels/mla_attention/common.py)."""
    from pallas_kernels import mla_attention

    if backend == "reference":
        return _with_scale(mla_attention.mla_absorbed_reference), "reference"
    reason = _mla_unsupported_reason(mesh.devices.flat[0].platform, arch, dtype, page_size, mesh.devices.size)
    if backend == "xla" or (backend == "auto" and reason is not None):
        if backend == "auto":
            logger.info("Attention (MLA): XLA path (%s)", reason)
        return _with_scale(mla_attention.mla_absorbed_xla), "xla"
    if backend != "pallas":
        raise ValueError(f"unknown attention backend {backend!r}")
    if reason is not None:
        raise ValueError(f"--attention-backend pallas cannot run this model: {reason}")
    from pallas_kernels.mla_attention.mosaic_gpu import mla_absorbed_mosaic

    logger.info("Attention (MLA): Pallas Mosaic GPU kernel")
    kernel = _with_scale(mla_absorbed_mosaic)
    if mesh.devices.size == 1:
        return kernel, "pallas"
    heads, meta = PartitionSpec(None, rules.q_heads, None), PartitionSpec()

    def sharded(*args):  # q_latent and q_pe split by head, the latent pages whole on every device
        return jax.shard_map(lambda *a: kernel(*a, args[7]), mesh=mesh, in_specs=(heads, heads) + (meta,) * 5,
                             out_specs=heads, check_vma=False)(*args[:7])

    return sharded, "pallas"


def _with_scale(fn):
    return lambda *args: fn(*args[:7], sm_scale=args[7])


def _mla_unsupported_reason(platform: str, arch: ModelArch, dtype, page_size: int, tp: int) -> str | None:
    if platform != "gpu":
        return f"the Pallas MLA kernel targets NVIDIA Hopper GPUs, not {platform}"
    from pallas_kernels.mla_attention.mosaic_gpu import mla_unsupported_reason

    mla = arch.mla
    return mla_unsupported_reason(dtype=dtype, num_heads=arch.num_heads // tp, kv_lora_rank=mla.kv_lora_rank,
                                  rope_dim=mla.qk_rope_head_dim, page_size=page_size)


def _select(backend: str, arch: ModelArch, dtype, page_size: int, mesh: Mesh, rules: ShardingRules):
    platform = mesh.devices.flat[0].platform
    tp = mesh.devices.size
    if backend == "reference":
        return ragged_paged_attention_reference, "reference"
    if backend == "xla":
        return ragged_paged_attention_xla, "xla"
    reason = pallas_unsupported_reason(platform, arch, dtype, page_size, tp)
    if backend == "pallas":
        if reason is not None:
            raise ValueError(f"--attention-backend pallas cannot run this model: {reason}")
    elif backend == "auto":
        if reason is not None:
            logger.info("Attention: XLA path (%s)", reason)
            return ragged_paged_attention_xla, "xla"
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    from pallas_kernels.ragged_paged_attention.mosaic_gpu import ragged_paged_attention_mosaic

    logger.info("Attention: Pallas Mosaic GPU kernel")
    kernel = ragged_paged_attention_mosaic
    if tp > 1:
        kernel = shard_over_heads(kernel, mesh, rules)
    return kernel, "pallas"
