"""The project's one atomic file writer: a file is replaced whole or not at all.

Device state (fedasls/device/store.py), the run records and checkpoint (server/checkpoint.py), the
strategies' state files (the global adapter, the privacy report) and exported logs all write
through `atomic_write`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"  # in the name of a temp file (or a folder set aside) next to its target


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; silently skipped where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` in one step, so it is never half-written: a temp file in the same folder,
    fsync, os.replace onto `path`, then fsync of the folder. `mode` (before the umask) applies from
    the temp file's creation, so a private file (0o600) is never readable by others, not even briefly."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
