"""The Mosaic GPU CPU simulator (private jax API), imported once, with a compile cache.

The simulator lives under `jax._src`, so a jax release may move or rename any of it. The kernel
tests must not go quiet when that happens: `require()` fails the test that needs the simulator
with a message naming each missing module or name (and the jax version), instead of skipping.
Fix it here, in one place: find the new home of the names in the jax source and update
`_API` below.

NOTE: jax 0.10.2's simulator (`thread_map._run_jaxpr`) re-traces, re-lowers and re-compiles
the kernel body for every grid point and thread (a new `jax.jit` object per call, so no cache
hits), which made each simulated kernel call take seconds. `install_compile_cache()` memoises
the compiled body per (jaxpr, argument shapes), which is what the upstream comment there says
should already happen. It changes no simulated semantics.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

import jax

# Every private module and attribute the tests use: {module: names}.
_API: dict[str, tuple[str, ...]] = {
    "jax._src.pallas.mosaic_gpu.interpret.params": ("InterpretGPUParams",),
    "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call": (
        "reset_gpu_interpret_mode_state",
        "get_races",
    ),
    # Patched by install_compile_cache (the simulator's per-call re-compile).
    "jax._src.pallas.mosaic.interpret.thread_map": ("_run_jaxpr",),
}


class SimulatorAPIMoved(RuntimeError):
    """jax's private Mosaic GPU simulator API is not where tests/kernels/mgpu_simulator.py looks."""


def _load() -> tuple[dict[str, ModuleType], list[str]]:
    modules: dict[str, ModuleType] = {}
    problems: list[str] = []
    for module_name, names in _API.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - an import error of any kind means "moved"
            problems.append(f"cannot import {module_name}: {e!r}")
            continue
        modules[module_name] = module
        problems += [f"{module_name} has no attribute {name!r}" for name in names if not hasattr(module, name)]
    return modules, problems


_MODULES, _PROBLEMS = _load()


def problems() -> list[str]:
    """What is missing from jax's simulator API (empty: everything the tests use is there)."""
    return list(_PROBLEMS)


def require() -> None:
    """Raise `SimulatorAPIMoved`, naming what moved, unless the whole simulator API is present."""
    if _PROBLEMS:
        raise SimulatorAPIMoved(
            f"jax {jax.__version__}: the private Mosaic GPU simulator API moved; the kernel's simulator "
            "tests cannot run. Update _API in tests/kernels/mgpu_simulator.py (absl-py must be "
            "installed too). Missing:\n  - " + "\n  - ".join(_PROBLEMS)
        )


def _module(name: str) -> ModuleType:
    require()
    return _MODULES[name]


def params(*, detect_races: bool = True):
    """Simulator settings: race detection on, fresh buffers (outputs too) filled with NaN."""
    cls = _module("jax._src.pallas.mosaic_gpu.interpret.params").InterpretGPUParams
    return cls(detect_races=detect_races, uninitialized_memory="nan")


def reset() -> None:
    _module("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call").reset_gpu_interpret_mode_state()


def races_found() -> bool:
    return bool(_module("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call").get_races().races_found)


_compiled: dict = {}
_lock = threading.Lock()


def install_compile_cache() -> None:
    thread_map = _module("jax._src.pallas.mosaic.interpret.thread_map")
    if getattr(thread_map, "_jaxllm_cached", False):
        return

    def run_jaxpr(jaxpr, consts, *args):
        leaves = jax.tree.leaves((consts, args))
        key = (id(jaxpr), tuple((x.shape, str(x.dtype)) for x in leaves))
        with _lock:
            entry = _compiled.get(key)
            if entry is None:

                def run(consts, *args):
                    jax.core.eval_jaxpr(jaxpr, consts, *args)

                # Keep the jaxpr alive with its executable, so its id stays unique.
                entry = (jax.jit(run).trace(consts, *args).lower().compile(), jaxpr)
                _compiled[key] = entry
        entry[0](consts, *args)

    thread_map._run_jaxpr = run_jaxpr
    thread_map._jaxllm_cached = True
