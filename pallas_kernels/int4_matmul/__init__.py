"""int4 weight-only matmul (AWQ, GPTQ, compressed-tensors pack-quantized checkpoints): the formats
(`formats.py`), the kernel's weight layout `Int4Weights` (`common.py`), the reference (test oracle),
the XLA path (dequantize + dot), and the Mosaic GPU kernel for Hopper (`mosaic_gpu.py`, imported
from there)."""

from pallas_kernels.int4_matmul.common import Int4Weights, validate_inputs
from pallas_kernels.int4_matmul.reference import int4_matmul_reference
from pallas_kernels.int4_matmul.xla import int4_matmul_xla

__all__ = ["Int4Weights", "int4_matmul_reference", "int4_matmul_xla", "validate_inputs"]
