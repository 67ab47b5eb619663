"""Multi-head latent attention (DeepSeek-V2/V3) over a latent page pool: the absorbed form (decode,
and any query as a fallback) and the expanded form (prefill), each as a jnp reference and an XLA
path, and the latent page write."""

from pallas_kernels.mla_attention.common import gather_latents, write_latent_pages
from pallas_kernels.mla_attention.reference import mla_absorbed_reference, mla_expanded_reference
from pallas_kernels.mla_attention.tiles import MlaXlaBlocks
from pallas_kernels.mla_attention.xla import mla_absorbed_xla, mla_expanded_xla

__all__ = [
    "MlaXlaBlocks",
    "gather_latents",
    "mla_absorbed_reference",
    "mla_absorbed_xla",
    "mla_expanded_reference",
    "mla_expanded_xla",
    "write_latent_pages",
]
