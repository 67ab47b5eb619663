"""Fixtures shared by the kernel tests."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.kernels import mgpu_simulator


@pytest.fixture(scope="session")
def simulator() -> ModuleType:
    """The Pallas Mosaic GPU simulator, ready (fails the test, plainly, if jax moved its API)."""
    try:
        mgpu_simulator.require()
    except mgpu_simulator.SimulatorAPIMoved as e:
        pytest.fail(str(e), pytrace=False)
    mgpu_simulator.install_compile_cache()
    return mgpu_simulator
