"""Multi-process (multi-host) set-up on JAX's own runtime, `jax.distributed`.

One process per host; every process runs the same program. Process 0 hosts the coordinator;
the others find it through the cluster environment (SLURM, Open MPI, Kubernetes) or the
explicit address. After `initialize`, `jax.devices()` lists the devices of every process and
`jax.local_devices()` this one's.
"""

from __future__ import annotations

import jax

# A process that stops heart-beating (killed, hung, lost host) makes the others fail with an
# error after this long instead of waiting forever in a collective.
HEARTBEAT_TIMEOUT_SECONDS = 60


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
) -> None:
    """Joins the run: explicit arguments, or (all None) autodetection from the cluster environment."""
    # CPU devices need a collectives backend across processes (GPUs use NCCL); harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )

