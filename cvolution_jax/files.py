"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one;
and strict JSON for the metrics files."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """`with atomic_open(path) as f: ...` writes a temporary file next to `path`, flushes it to disk
    and renames it over `path` when the block succeeds; if it raises, `path` is untouched and the
    temporary file removed. The file gets the permissions of a fresh `open(path, "w")`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def strict_json(value):
    """`value` with every NaN or infinite float replaced by None, so `json.dumps` writes strict JSON
    (`null`, which every parser reads, instead of Python's bare `NaN`). Dicts, lists and tuples are
    walked; a missing metric (a segmentation class absent from the eval set) reads back as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value
