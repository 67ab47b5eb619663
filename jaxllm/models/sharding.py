"""Logical sharding axes -> mesh axes, in one table.

Model code names logical axes only (`vocab`, `embed`, `q_heads`, `kv_heads`, `mlp`, `experts`,
`expert_mlp`); this module maps them onto a mesh with a `tp` axis. Column-parallel q/k/v and
gate/up, row-parallel o and down, vocab-parallel embedding and lm_head. When tp exceeds the KV
head count the KV heads (k/v projections and KV pages) are replicated instead. MoE experts are
split along their intermediate dim (as vLLM's TP MoE), or with expert parallelism spread whole
over the devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.model_arch import ModelArch

TP = "tp"


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (or None: replicated)."""

    vocab: str | None = TP
    embed: str | None = None
    q_heads: str | None = TP
    kv_heads: str | None = TP
    mlp: str | None = TP
    # MoE experts: tensor parallel splits each expert's intermediate dim (`expert_mlp`), expert
    # parallel splits the experts (`experts`) across the same devices.
    experts: str | None = None
    expert_mlp: str | None = TP
    # MLA (DeepSeek): one latent page pool that every device holds whole, as vLLM keeps it.
    latent_kv: bool = False

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        return PartitionSpec(*(getattr(self, a) if a is not None else None for a in logical_axes))


def make_mesh(tp: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else default_devices(tp))
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size={tp} exceeds the {len(devices)} visible devices")
    # NOTE: jax.sharding.Mesh keeps AxisType.Auto, so GSPMD propagates shardings between the
    # annotated weights (jax.make_mesh would default to Explicit axes).
    return Mesh(np.array(devices[:tp]), (TP,))


def default_devices(tp: int) -> list:
    """The devices a tp mesh takes: the first tp of one process; in a multi-process run, tp / N
    local devices of each of the N processes (every process must hold part of every step)."""
    devices = jax.devices()
    num_processes = jax.process_count()
    if num_processes == 1:
        return devices
    if tp % num_processes:
        raise ValueError(
            f"tensor_parallel_size={tp} must be a multiple of the {num_processes} processes "
            "(each process holds an equal share of the mesh)"
        )
    per_process = tp // num_processes
    local = [[d for d in devices if d.process_index == p] for p in range(num_processes)]
    short = [p for p, ds in enumerate(local) if len(ds) < per_process]
    if short:
        raise ValueError(
            f"tensor_parallel_size={tp} over {num_processes} processes needs {per_process} devices in each; "
            f"process {short[0]} has {len(local[short[0]])}"
        )
    return [d for ds in local for d in ds[:per_process]]


def rules_for(arch: ModelArch, tp: int, expert_parallel: bool = False) -> ShardingRules:
    """Check that tp divides the model and pick the rules (KV heads replicated if tp > Hkv;
    `expert_parallel`: MoE experts spread over the devices instead of split)."""
    if arch.num_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the {arch.num_heads} attention heads")
    dense_mlp = arch.moe is None or not all(arch.moe.sparse_layers)
    if dense_mlp and arch.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={arch.intermediate_size}")
    experts, expert_mlp = _expert_axes(arch, tp, expert_parallel)
    if arch.num_kv_heads % tp == 0:
        kv = TP
    elif tp % arch.num_kv_heads == 0:
        kv = None
    else:
        raise ValueError(
            f"tensor_parallel_size={tp} and the {arch.num_kv_heads} KV heads must divide one another"
        )
    vocab = TP if arch.vocab_size % tp == 0 else None
    if arch.mla is not None:
        kv = None
    return ShardingRules(vocab=vocab, kv_heads=kv, experts=experts, expert_mlp=expert_mlp,
                         latent_kv=arch.mla is not None)


def _expert_axes(arch: ModelArch, tp: int, expert_parallel: bool) -> tuple[str | None, str | None]:
    """(experts, expert_mlp) mesh axes."""
    if arch.moe is None:
        if expert_parallel:
            raise ValueError("--enable-expert-parallel needs a mixture-of-experts model")
        return None, TP
    if expert_parallel:
        if arch.moe.num_experts % tp:
            raise ValueError(f"expert parallelism over {tp} devices must divide the {arch.moe.num_experts} experts")
        return TP, None
    if arch.moe.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the experts' intermediate size {arch.moe.intermediate_size}"
        )
    return None, TP


def kv_pages_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    if rules.latent_kv:  # [num_pages, page_size, R + Dr], replicated
        return NamedSharding(mesh, PartitionSpec())
    # [2, Hkv, num_pages, page_size, D]
    return NamedSharding(mesh, PartitionSpec(None, rules.kv_heads, None, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
