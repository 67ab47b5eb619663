"""Device code: model loading, KV pages, bucketed compiled steps, on-device sampling (and the pure
resolution of the engine's limits from what was measured, `limits`).

NOTE: two settings must be in the environment before jax starts its GPU backend:
- XLA_PYTHON_CLIENT_MEM_FRACTION: let jax reserve most of the device, so that
  `gpu_memory_utilization` (not jax's 75% default) decides the budget.
- --xla_gpu_enable_triton_gemm=false: plain cuBLAS GEMMs. Autotuning Triton GEMM tilings makes
  each bucket's compile far slower, the more so with buckets compiling in parallel.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
