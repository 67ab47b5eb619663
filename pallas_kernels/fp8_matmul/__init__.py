"""FP8 (e4m3) weights and activations (W8A8): the weight layout and activation quantization
(`common.py`), the checkpoint formats in numpy (`formats.py`), the reference (test oracle, fake
quantization in float32) and the XLA path (XLA's FP8 dot: cuBLASLt on Hopper)."""

from pallas_kernels.fp8_matmul.common import E4M3_MAX, Fp8Weights, quantize_activations
from pallas_kernels.fp8_matmul.reference import fp8_matmul_reference
from pallas_kernels.fp8_matmul.xla import fp8_matmul_xla

__all__ = ["E4M3_MAX", "Fp8Weights", "fp8_matmul_reference", "fp8_matmul_xla", "quantize_activations"]
