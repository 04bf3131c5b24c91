"""The server's private state: the DP secrets (fedasls.privacy.secrets), in the run's
server-private.json, file mode 0600.

It is the one file of a run folder that must never be published: with it, anyone can regenerate
the DP noise and undo it. Results, logs, config.toml and downlinks never hold it. A resumed run
restores it, so it continues with exactly the noise and the sample an uninterrupted run would
have drawn; delete it after the run to make the noise unrecoverable even to the operator (the run
can then no longer be resumed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedasls.config import Settings
from fedasls.errors import FedaslsError
from fedasls.privacy.secrets import DpSecrets

PRIVATE_FILE = "server-private.json"


class PrivateStateError(FedaslsError):
    """A DP run's private state is missing or damaged, so it cannot continue exactly."""


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file readable by its owner only (0600 from creation, never wider)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def dp_secrets(settings: Settings, run_dir: Path, resume: bool) -> DpSecrets | None:
    """The run's DP secrets (None when the run has no user-level DP): fresh OS randomness (or, opted
    in, derived from [federated] noise_seed) for a new run, written to server-private.json; read back
    on resume."""
    f = settings.federated
    if not f.dp:
        return None
    path = run_dir / PRIVATE_FILE
    if resume and path.is_file():
        try:
            return DpSecrets.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            raise PrivateStateError(f"{path} is damaged, so the run cannot continue with its own DP noise. Fix: "
                                    "restore it from a copy, or start the run again with --overwrite.") from None
    if resume and (run_dir / "rounds.jsonl").is_file() and (run_dir / "rounds.jsonl").stat().st_size > 0:
        raise PrivateStateError(f"{path} is missing, so the run cannot continue with its own DP noise and sample "
                                "(a new secret would make it a different run). Fix: restore that file, or start the "
                                "run again with --overwrite.")
    secrets = DpSecrets.from_noise_seed(f.noise_seed) if f.noise_seed is not None else DpSecrets.fresh()
    _write_private(path, json.dumps(secrets.to_json()).encode("utf-8"))
    return secrets
