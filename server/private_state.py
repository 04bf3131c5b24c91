"""The server's private state: the DP secrets (fedasls.privacy.secrets), kept OUTSIDE the run
folder, in the server's private directory (FEDASLS_PRIVATE_DIR, else $XDG_STATE_HOME/fedasls/private,
else ~/.local/state/fedasls/private; folder 0700, file 0600), named by the run's random id.

With that file anyone could regenerate the DP noise and undo it, so nothing that may be published
holds it: not the run folder, results, logs, config.toml or downlinks. A resumed run (on the same
machine) restores it, so it continues with exactly the noise and the sample an uninterrupted run
would have drawn; delete it after the run to make the noise unrecoverable even to the operator (the
run can then no longer be resumed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedasls.config import Settings
from fedasls.errors import FedaslsError
from fedasls.files import atomic_write
from fedasls.privacy.secrets import DpSecrets
from server.checkpoint import run_id

def private_root() -> Path:
    """The server's private directory (created 0700)."""
    if env := os.environ.get("FEDASLS_PRIVATE_DIR"):
        root = Path(env)
    else:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        root = Path(state) / "fedasls" / "private"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def private_path(run_dir: Path) -> Path:
    """Where a run's private state lives: <private root>/<run id>.json."""
    return private_root() / f"{run_id(run_dir)}.json"


class PrivateStateError(FedaslsError):
    """A DP run's private state is missing or damaged, so it cannot continue exactly."""


def dp_secrets(settings: Settings, run_dir: Path, resume: bool) -> DpSecrets | None:
    """The run's DP secrets (None when the run has no user-level DP): fresh OS randomness (or, opted
    in, derived from [federated] noise_seed) for a new run, written to its private file; read back on
    resume."""
    f = settings.federated
    if not f.dp:
        return None
    path = private_path(run_dir)
    if resume and path.is_file():
        try:
            return DpSecrets.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            raise PrivateStateError(f"{path} is damaged, so the run cannot continue with its own DP noise. Fix: "
                                    "restore it from a copy, or start the run again with --overwrite.") from None
    if resume and (run_dir / "rounds.jsonl").is_file() and (run_dir / "rounds.jsonl").stat().st_size > 0:
        raise PrivateStateError(f"{path} (this run's private DP state, kept by the machine that ran its server) is "
                                "missing, so the run cannot continue with its own DP noise and sample (a new secret "
                                "would make it a different run). Fix: resume on that machine or restore the file "
                                "(FEDASLS_PRIVATE_DIR points elsewhere), or start the run again with --overwrite.")
    secrets = DpSecrets.from_noise_seed(f.noise_seed) if f.noise_seed is not None else DpSecrets.fresh()
    atomic_write(path, json.dumps(secrets.to_json()).encode("utf-8"), mode=0o600)
    return secrets
