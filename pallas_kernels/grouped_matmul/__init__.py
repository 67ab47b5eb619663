"""Grouped matmul (the MoE experts' GEMM): reference (test oracle), XLA path (CPU + GPU fallback),
and the Mosaic GPU kernel for Hopper (`mosaic_gpu.py`, imported from there); each takes dense
weights or packed MXFP4 ones (`mxfp4.py`)."""

from pallas_kernels.grouped_matmul.common import Activation, interleaved_to_split, validate_inputs
from pallas_kernels.grouped_matmul.mxfp4 import Mxfp4Weights
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.xla import grouped_matmul_xla

__all__ = [
    "Activation",
    "Mxfp4Weights",
    "interleaved_to_split",
    "grouped_matmul_reference",
    "grouped_matmul_xla",
    "validate_inputs",
]
