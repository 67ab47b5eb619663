"""Device code: model loading, KV pages, bucketed compiled steps, on-device sampling.

NOTE: jax reads XLA_PYTHON_CLIENT_MEM_FRACTION when its GPU backend starts; let it reserve
most of the device so `gpu_memory_utilization` (not jax's 75% default) decides the budget.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
