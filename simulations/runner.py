"""Run a scenario on Flower's Simulation Engine (Ray backend) and write its results folder."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from collections.abc import Callable

from flwr.app import Message
from flwr.simulation import run_simulation

from clients.app import app as client_app
from fedasls.config import Settings, load_settings
from fedasls.model import ensure_model
from server.app import make_server_app
from server.checkpoint import RunFailed
from server.fleet import FleetRun
from simulations.validation import check_resume_matches, check_run_inputs, new_run_dir  # noqa: F401


def num_slots(settings: Settings) -> int:
    """SuperNodes to start: enough worker slots for one over-committed cohort."""
    sim = settings.simulation
    return max(1, min(settings.population.num_devices, math.ceil(sim.cohort_size * sim.overcommit - 1e-9)))


def backend_config(settings: Settings) -> dict[str, Any]:
    """Ray backend: `workers` actors, each with `cpus_per_worker` CPUs (one base model each)."""
    sim = settings.simulation
    return {
        "client_resources": {"num_cpus": sim.cpus_per_worker, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, math.ceil(sim.workers * sim.cpus_per_worker)),
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }


def simulate(settings: Settings, run_dir: Path, config_source: Path | None = None, resume: bool = False,
             quiet: bool = False, on_reply: Callable[[Message], None] | None = None,
             started: float | None = None, validate: bool = True) -> FleetRun:
    """Validate the inputs, run every round on Ray, and return the finished FleetRun.

    The dataset and model are checked here, before Ray starts (simulations/validation.py). A
    resumed run keeps its config.toml (rewritten only when more rounds were asked for). Raises
    RunFailed when more than simulation.max_failed_share of the device rounds failed. `validate`
    = False skips the checks when the caller made them already."""
    # Build (or find) the base model once here, and check it, so Ray workers only load it.
    model_path = check_run_inputs(settings) if validate else ensure_model(settings.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = run_dir / "config.toml"
    if resume and recorded.is_file():
        previous = load_settings(recorded)
        check_resume_matches(run_dir, previous, settings)
        if previous != settings:  # more rounds: the whole run's settings, not this part's alone
            recorded.write_text(settings_toml(settings))
    else:
        recorded.write_text(settings_toml(settings))
    if config_source is not None and not resume:
        shutil.copyfile(config_source, run_dir / "scenario.toml")
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"path": str(model_path)})})
    store_dir = Path(settings.simulation.store_dir) if settings.simulation.store_dir else run_dir / "store"
    run = FleetRun(settings, run_dir, store_dir, resume=resume, quiet=quiet, expected_slots=num_slots(settings),
                   on_reply=on_reply, started=started if started is not None else time.perf_counter())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU actors: keep Ray's GPU env as is
    # Flower logs through its own console handler; a root handler (installed by another library's
    # logging.basicConfig) would otherwise echo its DEBUG records too.
    logging.getLogger("flwr").propagate = False
    run_simulation(
        server_app=make_server_app(run),
        client_app=client_app,
        num_supernodes=num_slots(settings),
        backend_name="ray",
        backend_config=backend_config(settings),
    )
    if run.failure:
        raise RunFailed(run.failure, run)
    return run


def settings_toml(settings: Settings) -> str:
    """The resolved settings as TOML (what the run actually used)."""
    lines: list[str] = []
    for section, values in settings.model_dump(mode="json").items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
