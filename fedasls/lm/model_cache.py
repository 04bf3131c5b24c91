"""The on-disk model cache: where built models live, and building each one once.

Light on purpose (no torch, no transformers): the command line and the preset registry use it
without importing a model library.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

BUILD_INFO = "fedasls_build.json"  # written last into a finished build: its presence means "built"


def cache_root(cache_dir: str | Path | None) -> Path:
    """The model cache: `cache_dir`, else $FEDASLS_CACHE, else ~/.cache/fedasls."""
    root = cache_dir or os.environ.get("FEDASLS_CACHE") or Path.home() / ".cache" / "fedasls"
    return Path(root).expanduser().resolve()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held on `path` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(target)` unless a finished build (its BUILD_INFO) is already there;
    file-locked, so concurrent processes build it once."""
    if (target / BUILD_INFO).is_file():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if not (target / BUILD_INFO).is_file():  # another process may have built it meanwhile
            build(target)
    return target


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` folder to `target`, replacing an old one."""
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(target)
