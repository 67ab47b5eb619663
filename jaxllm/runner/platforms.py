"""The platforms jax may start in this process: those of the installed accelerator plugins, then the CPU.

NOTE: with no list, jax tries every backend it knows, the TPU's among them, and logs the TPU's failure
on every machine without libtpu. A GPU plugin installed on a machine with no visible GPU is still
skipped by jax.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import pkgutil

import jax

logger = logging.getLogger(__name__)

_PLUGIN_PLATFORMS = ("cuda", "rocm")  # a jax plugin's name holds its platform's: xla_cuda13, ...


def select_jax_platforms() -> None:
    """Set `jax_platforms` to the installed ones, unless it is set already (JAX_PLATFORMS, or the caller).

    Must run before anything touches a device: a list set after that is ignored."""
    if getattr(jax.config, "jax_platforms", None):
        return
    platforms = [*installed_accelerator_platforms(), "cpu"]
    logger.debug("jax platforms: %s", platforms)
    jax.config.update("jax_platforms", ",".join(platforms))


def installed_accelerator_platforms() -> list[str]:
    """The accelerator platforms whose jax plugin (or libtpu) is installed, in jax's order of preference."""
    plugins = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins  # noqa: PLC0415  (the namespace package plugins install into)
    except ImportError:
        pass
    else:
        plugins |= {module.name for module in pkgutil.iter_modules(jax_plugins.__path__)}
    platforms = [platform for platform in _PLUGIN_PLATFORMS if any(platform in name for name in plugins)]
    if importlib.util.find_spec("libtpu") is not None:
        platforms.append("tpu")
    return platforms
