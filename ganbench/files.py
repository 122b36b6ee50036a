"""The bottom I/O layer: files written whole or not at all, JSON, and plot points.

Every report, export and checkpoint goes through here. Nothing here imports torch,
matplotlib or Optuna, so a worker process that stores a trial's points loads none of the
report's libraries.

``atomic(path)`` yields a temporary name beside ``path``; on success it replaces ``path`` in
one step, on any error (a full disk, a kill signal, a bug) the temporary file is removed
and ``path`` is as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

PLOT_POINTS = 500  # samples kept per trial (and of the target) for the report's scatters


@contextlib.contextmanager
def atomic(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path`` through (same folder and suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Can ``folder`` be created (or written) here? Checked before a long run writes its
    report at the end: a GanbenchError naming the path that is in the way."""
    from ganbench.errors import GanbenchError

    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise GanbenchError(f"{probe}: is a file; the report needs a folder {folder}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GanbenchError(f"{probe}: not writable; the report needs a folder {folder}")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between the processes of this machine, held on the file ``path``
    (created if needed; the file itself stays, empty)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def json_ready(value: Any) -> Any:
    """Replace non-finite floats by None (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON (non-finite floats as null), whole or not at all."""
    atomic_write_text(path, json.dumps(json_ready(data), indent=2) + "\n")


def points(x: Any) -> list[list[float]]:
    """The first PLOT_POINTS samples' first two coordinates, rounded (for JSON storage);
    ``x`` is a tensor or array of shape [n, d]."""
    return [[round(float(v), 4) for v in row[:2]] for row in x[:PLOT_POINTS].tolist()]
