"""Multi-process (multi-host) runs on JAX's own runtime: `jax.distributed.initialize`.

    process 0 (coordinator)          process 1 ... N-1
    initialize(host:port, N, 0)      initialize(host:port, N, i)
    mesh over jax.devices(): every process's devices, tp / N of them held by each process
    the same requests, in the same order ─▶ the same deterministic scheduler on every process
    ─▶ the same SchedulerOutput ─▶ the same SPMD step; sampled tokens come back replicated

NOTE: nothing but XLA's collectives crosses the hosts. Every process must be given the same
requests in the same order (the offline API with the same prompts): the scheduler, the block
manager and the engine's seeds depend only on that, so the processes stay in lockstep. A process
that diverges waits in a collective until the runtime times out.

The server runs on process 0 only: its engine loop publishes each iteration (the commands it applied,
and whether it stepped), which the other processes replay (`jaxllm.engine.core.follow`), through the
coordination service that `jax.distributed` already runs on process 0 (`StepPublisher` / `StepReceiver`).
"""

from __future__ import annotations

import logging
import pickle

import jax

from jaxllm.config import ParallelConfig
from jaxllm.engine.core import Iteration

logger = logging.getLogger(__name__)


def initialize(parallel: ParallelConfig) -> None:
    """Join the multi-process run described by `parallel` (a no-op for one process).

    Must run before anything touches a device: the backends are built with the processes' topology.
    """
    if parallel.num_processes <= 1:
        return
    if jax.distributed.is_initialized():
        joined = (jax.process_count(), jax.process_index())
        if joined != (parallel.num_processes, parallel.process_id):
            raise RuntimeError(
                f"jax.distributed is already initialized as process {joined[1]} of {joined[0]}, not "
                f"{parallel.process_id} of {parallel.num_processes}"
            )
        return
    # NOTE: cross-process collectives on CPU go through gloo, jax's default; GPUs use NCCL.
    logger.info(
        "Joining a %d-process run as process %d (coordinator %s)",
        parallel.num_processes, parallel.process_id, parallel.distributed_coordinator,
    )
    jax.distributed.initialize(
        coordinator_address=parallel.distributed_coordinator,
        num_processes=parallel.num_processes,
        process_id=parallel.process_id,
    )
    logger.info(
        "Process %d of %d: %d local device(s) of %d", jax.process_index(), jax.process_count(),
        jax.local_device_count(), jax.device_count(),
    )


# ----- the multi-process server: process 0's loop iterations, replayed on the others ----------------

_STEP_KEY = "jaxllm/steps/{process}/{seq}"
_POLL_MS = 60_000  # a follower waits this long per poll while the server is idle, then polls again


def _kv_client():
    # NOTE: the coordination service's key-value store has no public API in jax 0.10.2; jax's own
    # compilation cache sharing (jax/_src/compiler.py) uses this same client.
    from jax._src import distributed as jax_distributed  # noqa: PLC0415

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (num_processes > 1 needs it)")
    return client


class StepPublisher:
    """Process 0: each `Iteration` of its engine loop, sent to every other process (one key each).

    NOTE: messages are pickled; the coordinator is part of the deployment and trusted, as the
    processes already trust each other with the model's collectives.
    """

    def __init__(self, num_processes: int):
        self._client = _kv_client()
        self._followers = range(1, num_processes)
        self._seq = 0

    def __call__(self, message: Iteration) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for process in self._followers:
            self._client.key_value_set_bytes(_STEP_KEY.format(process=process, seq=self._seq), payload)
        self._seq += 1


class StepReceiver:
    """Processes 1..N-1: the next `Iteration` of process 0 (blocks while the server is idle)."""

    def __init__(self, process_id: int):
        self._client = _kv_client()
        self._process = process_id
        self._seq = 0

    def __call__(self) -> Iteration:
        key = _STEP_KEY.format(process=self._process, seq=self._seq)
        while True:
            try:
                payload = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._client.key_value_delete(key)  # read once, by this process only
        self._seq += 1
        return pickle.loads(payload)
