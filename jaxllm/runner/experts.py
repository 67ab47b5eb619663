"""The MoE experts of a step: the grouped GEMM picked per problem shape (the Mosaic GPU kernel
where it can run, else the XLA path), run per device under shard_map and summed over the mesh.

Under tensor parallelism each device holds every expert's slice of the intermediate dim; under
expert parallelism it holds whole experts, the others' tokens sorted past its groups. Either way
the activations are replicated, so each device's partial [T, H] is added over the mesh (one
all-reduce per MoE layer, as a dense MLP's row-parallel down projection).
"""

from __future__ import annotations

import logging
from functools import partial

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxllm.models.moe import SWIGLU, ExpertsFn, moe_experts
from jaxllm.models.sharding import TP, ShardingRules
from pallas_kernels.grouped_matmul import Activation, grouped_matmul_xla

logger = logging.getLogger(__name__)


def gpu_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, bias: jax.Array | None = None,
                       activation: Activation | None = None) -> jax.Array:
    """The Mosaic GPU kernel where it can run this (static) shape, else the XLA path."""
    from pallas_kernels.grouped_matmul import mosaic_gpu  # noqa: PLC0415 - a GPU-only import

    reason = mosaic_gpu.mosaic_unsupported_reason(dtype=lhs.dtype, m=lhs.shape[0], k=lhs.shape[1], n=rhs.shape[2],
                                                  num_groups=rhs.shape[0], activation=activation)
    if reason is not None:
        logger.debug("MoE experts: XLA grouped matmul for [%d, %d] x %s (%s)", *lhs.shape, rhs.shape, reason)
        return grouped_matmul_xla(lhs, rhs, group_sizes, bias=bias, activation=activation)
    return mosaic_gpu.grouped_matmul_mosaic(lhs, rhs, group_sizes, bias=bias, activation=activation)


def select_experts(mesh: Mesh, rules: ShardingRules) -> ExpertsFn:
    """The experts function the MoE layers call (`models.moe.ExpertsFn`)."""
    gmm = gpu_grouped_matmul if mesh.devices.flat[0].platform == "gpu" else grouped_matmul_xla
    if mesh.devices.size == 1:
        return partial(moe_experts, gmm=gmm)
    replicated = PartitionSpec()
    weight_specs = (PartitionSpec(rules.experts, None, None, rules.expert_mlp),  # gate_up [E, H, 2, I]
                    PartitionSpec(rules.experts, rules.expert_mlp, None),  # down [E, I, H]
                    PartitionSpec(rules.experts, None, rules.expert_mlp))  # gate_up_bias [E, 2, I]

    def experts(x, expert_ids, expert_weights, num_tokens, gate_up, down, gate_up_bias=None, *,
                activation: Activation = SWIGLU):
        def per_device(x, expert_ids, expert_weights, num_tokens, gate_up, down, *bias):
            first = jax.lax.axis_index(TP) * gate_up.shape[0] if rules.experts is not None else 0
            y = moe_experts(x, expert_ids, expert_weights, num_tokens, gate_up, down, *bias, gmm=gmm,
                            first_expert=first, activation=activation)
            return jax.lax.psum(y, TP)

        bias = () if gate_up_bias is None else (gate_up_bias,)
        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(replicated,) * 4 + weight_specs[:2 + len(bias)],
            out_specs=replicated,
            check_vma=False,
        )(x, expert_ids, expert_weights, num_tokens, gate_up, down, *bias)

    return experts
