"""One training run per workdir: `<workdir>/run.lock`, held with `flock` and naming its owner.

Two runs training into one workdir would both write every metrics record and race on the
checkpoints. The first run holds an exclusive `flock` on `run.lock` and writes its host, pid and
start time into it; a second run finds the lock held and stops with one sentence naming the owner.
The kernel releases a `flock` when its process ends, however it ends, so a lock left behind by a
killed run (SIGKILL, a crash, a lost node) is taken over by the next run, which says so. A run that
ends normally empties the file; the file itself stays, so every run locks the same inode.

Multi-process runs lock once, from process 0 (the processes of one run share the workdir).
`flock` is advisory: only runs of this project honour it. It holds on local filesystems and on
NFS (Linux emulates it with byte-range locks there).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket

import jax

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir's lock."""


def _owner(text: str) -> str:
    """`pid 123 on host h, since 2026-12-07T10:00:00+00:00` from a lock file's content."""
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on host {record['host']}, since {record['started']}"
    except (ValueError, KeyError, TypeError):
        return f"an unreadable owner record ({text[:80]!r})"


@contextlib.contextmanager
def hold(workdir: str):
    """Holds `<workdir>/run.lock` for the duration of a training run (process 0 only).

    Raises:
      WorkdirInUse: another running process holds it; the message names it and what to do.
    """
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise WorkdirInUse(
                f"--workdir {workdir} is being trained by another run ({owner}; {path} is locked). Wait for it to end, "
                f"stop it, or give another --workdir; evaluating its checkpoints (--config.mode=eval) needs no lock."
            ) from None
        left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if left:
            log.warning("%s was left by a run that is no longer running (%s): it was killed or crashed. "
                        "Taking over; its checkpoints are resumed as usual.", path, _owner(left))
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # ended: no owner (the file stays, so every run locks one inode)
    finally:
        os.close(fd)  # releases the flock
