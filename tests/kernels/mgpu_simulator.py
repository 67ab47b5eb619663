"""The Mosaic GPU CPU simulator (private jax API), imported once, with a compile cache.

`available()` says whether this jax has the simulator; tests skip with `reason()` otherwise.

NOTE: jax 0.10.2's simulator (`thread_map._run_jaxpr`) re-traces, re-lowers and re-compiles
the kernel body for every grid point and thread (a new `jax.jit` object per call, so no cache
hits): 1-3 s each. `install_compile_cache()` memoises the compiled body per (jaxpr, argument
shapes), which is what the upstream comment there says should already happen. It changes no
simulated semantics.
"""

from __future__ import annotations

import threading

import jax

try:
    from jax._src.pallas.mosaic.interpret import thread_map as _thread_map
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as _interpret
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - any failure means "no simulator here"
    _IMPORT_ERROR = f"Mosaic GPU simulator unavailable in jax {jax.__version__}: {e!r}"


def available() -> bool:
    return _IMPORT_ERROR is None


def reason() -> str:
    return _IMPORT_ERROR or ""


def params(*, detect_races: bool = True):
    """Simulator settings: race detection on, fresh buffers (outputs too) filled with NaN."""
    return InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan")


def reset() -> None:
    _interpret.reset_gpu_interpret_mode_state()


def races_found() -> bool:
    return bool(_interpret.get_races().races_found)


_compiled: dict = {}
_lock = threading.Lock()


def install_compile_cache() -> None:
    if getattr(_thread_map, "_jaxllm_cached", False) or not hasattr(_thread_map, "_run_jaxpr"):
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

    _thread_map._run_jaxpr = run_jaxpr
    _thread_map._jaxllm_cached = True
