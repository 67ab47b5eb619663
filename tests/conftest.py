"""Session-wide test setup.

NOTE: the CPU backend is given 4 devices before jax starts, so multi-device (tensor-parallel)
tests can build 2- and 4-device meshes; single-device code uses the first device only.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
