"""Model families, one module each on the shared layers (`layers.py`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from jaxllm.model_arch import ModelArch


def family(arch: ModelArch) -> ModuleType:
    """The module that builds `arch` (`jaxllm.model_arch.ARCHITECTURES` names it): its
    `abstract_model(arch, dtype, fuse_qkv)` is the model with shapes and sharding axes, no memory."""
    return importlib.import_module(f"jaxllm.models.{arch.family}")
