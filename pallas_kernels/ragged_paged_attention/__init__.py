"""Ragged paged attention: reference (test oracle), XLA path (CPU + GPU fallback), and the KV write."""

from pallas_kernels.ragged_paged_attention.common import AttentionParams, validate_inputs, write_kv_pages
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.xla import XlaBlockSizes, ragged_paged_attention_xla

__all__ = [
    "AttentionParams",
    "XlaBlockSizes",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_xla",
    "validate_inputs",
    "write_kv_pages",
]
