"""Multi-process (multi-host) set-up on JAX's own runtime, `jax.distributed`.

One process per host; every process runs the same program. Process 0 hosts the coordinator;
the others find it through the cluster environment (SLURM, Open MPI, Kubernetes) or the
explicit address. After `initialize`, `jax.devices()` lists the devices of every process and
`jax.local_devices()` this one's.
"""

from __future__ import annotations

import jax
from absl import app, flags

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


def define_flags() -> None:
    """Defines the multi-process flags every entry point takes (call at import, before absl parses)."""
    flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the cluster environment (SLURM, Open MPI, Kubernetes).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator; with --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_integer("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT_SECONDS, "Multi-process: fail after a peer is silent this long.")


def initialize_from_flags() -> None:
    """Joins a multi-process run as `define_flags`'s flags say; does nothing for a single process."""
    FLAGS = flags.FLAGS
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        initialize(*explicit, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    elif FLAGS.multihost:
        initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
