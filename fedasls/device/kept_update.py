"""A device's clipped update kept on the device between the two phases of a two-phase round.

Two-phase upload ([simulation] upload = "two-phase", server/rounds.py): in phase 1 a device runs
its round and replies metrics only, keeping its clipped update here; once the round has closed
(K fastest, deadline), the server asks only the completed devices for it (phase 2). Stragglers
that will not count never upload.

The file is bound to one attempt of one round of one run by the server's round token
(`round_token`: the round number and a fresh random part per attempt), which is in its name:
an update kept by an earlier attempt (a run killed between the phases, then resumed) or an
earlier round never matches, and the device answers "no kept update" (FailureCode.NO_KEPT_UPDATE).
Written atomically (fedasls.files.atomic_write); a device keeps at most one.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from fedasls.files import atomic_write

PREFIX = "kept-update-"
SUFFIX = ".safetensors"
_TOKEN = re.compile(r"r[0-9]+-[0-9a-f]{16}")


def round_token(server_round: int) -> str:
    """A fresh token for one attempt of round `server_round` (server side)."""
    return f"r{int(server_round)}-{uuid.uuid4().hex[:16]}"


def _path(folder: Path, token: str) -> Path:
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a round token: {token!r} (expected r<round>-<16 hex digits>, from round_token)")
    return folder / f"{PREFIX}{token}{SUFFIX}"


def discard(folder: Path) -> None:
    """Remove every update the device keeps."""
    if folder.is_dir():
        for path in folder.glob(f"{PREFIX}*{SUFFIX}"):
            path.unlink(missing_ok=True)


def keep(folder: Path, token: str, update: dict[str, torch.Tensor]) -> int:
    """Keep `update` for the round `token` names (replacing any older one); returns its size in bytes."""
    path = _path(folder, token)
    discard(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in update.items()}
    atomic_write(path, save_tensors(tensors, metadata={"order": json.dumps(list(tensors))}))  # it sorts names
    return sum(int(t.numel()) * t.element_size() for t in tensors.values())


def take(folder: Path, token: str) -> dict[str, torch.Tensor] | None:
    """The update kept for `token` (removed from the device once read), or None if it holds none for it."""
    path = _path(folder, token)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in json.loads(f.metadata()["order"])}  # the kept order
    path.unlink(missing_ok=True)
    return tensors
