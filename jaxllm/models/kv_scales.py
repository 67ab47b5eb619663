"""FP8 KV scales kept beside each layer's pages, so they can change at run time: a checkpoint's, or
calibrated by the first step (`--calculate-kv-scales`, vLLM's `calculate_kv_scales`).

With them a layer's KV state is `ScaledKvPages(pages, scales)` instead of its page array. A scale of
0 means "not calibrated yet": the next write measures this step's real tokens and keeps, as vLLM
does on its first forward, k_scale = max|K| / 200 and v_scale = max|V| / 100 (vLLM's
K_SCALE_CONSTANT and V_SCALE_CONSTANT), one per tensor and layer, before it quantizes them.
Readers get the scales outside the attention function: q * k_scale and out * v_scale, exact for
per-tensor scales (softmax(q . (s K)) = softmax((s q) . K), and the output is linear in V), so every
attention implementation runs unchanged on pages whose static scales are 1.0.

Pages whose scales are static floats (`AttentionParams`, 1.0 without a checkpoint's) stay plain
arrays and trace the programs they always did.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxllm.models.loader import Checkpoint

logger = logging.getLogger(__name__)

K_SCALE_CONSTANT = 200.0  # vLLM's envs.K_SCALE_CONSTANT: k_scale = max|K| / 200
V_SCALE_CONSTANT = 100.0  # vLLM's envs.V_SCALE_CONSTANT: v_scale = max|V| / 100
UNCALIBRATED = 0.0

# Checkpoint tensor (after the layer's attention module) -> which of (k_scale, v_scale) it gives, as vLLM
# reads them: k_scale / v_scale; one kv_scale for both (older FP8 checkpoints); compressed-tensors' older
# k_proj / v_proj output scales.
_CHECKPOINT_SCALES: dict[str, tuple[int, ...]] = {
    "k_scale": (0,), "v_scale": (1,), "kv_scale": (0, 1), "k_proj.output_scale": (0,), "v_proj.output_scale": (1,),
}
_SCALE_NAME = re.compile(r"\.(" + "|".join(re.escape(s) for s in _CHECKPOINT_SCALES) + r")$")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ScaledKvPages:
    """One layer's KV state when its FP8 scales live on the device."""

    pages: jax.Array  # [2, Hkv, P, page, D] float8_e4m3fn: K / k_scale, V / v_scale
    scales: jax.Array  # [2] f32: (k_scale, v_scale); UNCALIBRATED until the first write measures them


def calibrated(scales: jax.Array, k: jax.Array, v: jax.Array, real: jax.Array) -> jax.Array:
    """scales [2] f32, with each UNCALIBRATED one measured from this step's real tokens: k, v [T, Hkv, D],
    real [T] bool (padding excluded). A step of all-zero keys keeps the smallest positive scale, so the
    write never divides by 0."""

    def amax(x: jax.Array) -> jax.Array:
        return jnp.max(jnp.where(real[:, None, None], jnp.abs(x.astype(jnp.float32)), 0.0))

    measured = jnp.stack([amax(k) / K_SCALE_CONSTANT, amax(v) / V_SCALE_CONSTANT])
    measured = jnp.maximum(measured, jnp.finfo(jnp.float32).tiny)
    return jnp.where(scales > UNCALIBRATED, scales, measured)


def read_checkpoint_kv_scales(checkpoint: Checkpoint, num_layers: int) -> np.ndarray | None:
    """[L, 2] f32 (k_scale, v_scale) per layer from an FP8 checkpoint's scale tensors
    (`model.layers.N.self_attn.k_scale`, ...; `_CHECKPOINT_SCALES`), or None when it has none. A layer the
    checkpoint gives no scale keeps 1.0, as in vLLM. A per-head scale tensor gives its largest head's:
    the per-tensor scale that saturates none of them."""
    scales = np.ones((num_layers, 2), np.float32)
    found = False
    for name in checkpoint.files:
        match = _SCALE_NAME.search(name)
        layer = [int(part) for part in name.split(".") if part.isdigit()]
        if match is None or len(layer) != 1 or not 0 <= layer[0] < num_layers:
            continue
        value = float(np.max(np.asarray(checkpoint.files[name].get(name), np.float32)))
        scales[layer[0], list(_CHECKPOINT_SCALES[match.group(1)])] = value
        found = True
    if found and not np.all(scales > 0):
        raise ValueError(f"the checkpoint's KV scales must be positive, got {scales.tolist()}")
    return scales if found else None
