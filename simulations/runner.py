"""Run a scenario on Flower's Simulation Engine (Ray backend) and write its results folder.

Ray is started here with `workers x cpus_per_worker x devices_per_worker` CPUs, or, when
`simulation.ray_address` (or RAY_ADDRESS) is set, an existing cluster is attached instead (no
num_cpus then) and the plan follows the cluster's CPUs. Flower runs at most
min(32, cpu_count + 4) ClientApp calls at once on the driver host (one thread each, whatever the
cluster's size), so to keep every cluster CPU busy each worker slot runs several devices side by
side (`devices_per_worker`, one process each): concurrent devices = worker slots in use x
devices per worker, not capped by Flower's threads.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collections.abc import Callable

from flwr.app import Message
from flwr.simulation import run_simulation

from clients.app import app as client_app
from fedasls.config import Settings, devices_per_round, load_settings, secagg_devices_per_round, settings_toml
from fedasls.data.sources import ATTRIBUTION_FILE, attribution_text
from fedasls.lm.model import ensure_model
from server.app import make_server_app
from server.checkpoint import RunFailed
from server.rounds import FleetRun
from simulations.local_ray import local_init_args, private_ray_dir
from simulations.local_ray import remove as remove_private_ray_dir
from simulations.validation import check_resume_matches, check_run_inputs, new_run_dir, record_inputs  # noqa: F401


FLOWER_CONCURRENT_CALLS = min(32, (os.cpu_count() or 1) + 4)  # Flower's driver-side ThreadPoolExecutor()


@dataclass(frozen=True)
class WorkerPlan:
    """How devices run on Ray: `workers` actors (worker slots in use), each running
    `devices_per_worker` devices side by side with `cpus_per_device` CPUs each."""

    workers: int
    devices_per_worker: int
    cpus_per_device: float

    @property
    def concurrent_devices(self) -> int:
        return self.workers * self.devices_per_worker


def plan_workers(settings: Settings, cluster_cpus: float | None = None,
                 flower_calls: int = FLOWER_CONCURRENT_CALLS) -> WorkerPlan:
    """The worker plan for these settings: on a local Ray, `workers` actors (at most Flower's
    concurrent calls); on an attached cluster of `cluster_cpus` CPUs, enough devices per worker
    that the workers Flower can drive at once fill the cluster."""
    sim = settings.simulation
    cpus = sim.cpus_per_worker
    if cluster_cpus is None:
        return WorkerPlan(min(sim.workers, flower_calls), sim.devices_per_worker, cpus)
    fit = max(1, int(cluster_cpus // cpus))  # devices the cluster runs at once
    per_worker = max(sim.devices_per_worker, math.ceil(fit / flower_calls))
    if settings.federated.secure_aggregation != "none":  # one SecAgg+ participant per SuperNode
        per_worker = 1
    return WorkerPlan(max(1, min(flower_calls, fit // per_worker)), per_worker, cpus)


def num_slots(settings: Settings, devices_per_worker: int = 1) -> int:
    """SuperNodes to start: enough worker slots for one over-committed cohort."""
    sim = settings.simulation
    target = devices_per_round(settings.population.num_devices, sim.cohort_size, sim.overcommit)
    if settings.federated.secure_aggregation != "none":  # one SuperNode per device (Poisson: a Binomial quantile)
        target = secagg_devices_per_round(settings)
    return max(1, math.ceil(target / devices_per_worker))


def ray_address(settings: Settings) -> str | None:
    """The Ray cluster to attach to: simulation.ray_address, else RAY_ADDRESS, else None (start Ray)."""
    return settings.simulation.ray_address or os.environ.get("RAY_ADDRESS") or None


def attach_ray(address: str) -> float:
    """Connect this driver to an existing Ray cluster (Flower then uses it as is); its CPUs."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")])
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
             logging_level=logging.ERROR, log_to_driver=False)
    return float(ray.cluster_resources().get("CPU", 0.0))


def backend_config(settings: Settings, plan: WorkerPlan, attached: bool = False,
                   private_dir: Path | None = None) -> dict[str, Any]:
    """Ray backend: one actor per worker, holding the CPUs of the devices it runs side by side. An
    attached cluster brings its own CPUs (never pass num_cpus to it); with `private_dir` a local Ray
    is a new instance in that folder (simulations/local_ray.py)."""
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if not attached:
        init_args |= {"num_cpus": max(1, math.ceil(plan.workers * plan.devices_per_worker * plan.cpus_per_device)),
                      "include_dashboard": False}
        if private_dir is not None:
            init_args |= local_init_args(private_dir)
    return {
        "client_resources": {"num_cpus": plan.cpus_per_device * plan.devices_per_worker,
                             "num_gpus": settings.simulation.gpus_per_worker * plan.devices_per_worker},
        "init_args": init_args,
    }


class HideRunSimulationDeprecation(logging.Filter):
    """Drop Flower's notice that `run_simulation` is deprecated in favour of `flwr run`.

    fedasls calls `run_simulation` on purpose (one process that owns the Ray backend, the worker
    slots and the run folder), so the notice asks a user of `fedasls simulate` to change code they
    did not write. Every other Flower record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(a, str) and "`run_simulation` function is deprecated" in a
                       for a in (record.args if isinstance(record.args, tuple) else ()))


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
    write_run_inputs(settings, run_dir, config_source, resume)
    settings = settings.model_copy(update={"model": settings.model.at_path(model_path)})
    store_dir = Path(settings.simulation.store_dir) if settings.simulation.store_dir else run_dir / "store"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU actors: keep Ray's GPU env as is
    # Flower logs through its own console handler; a root handler (installed by another library's
    # logging.basicConfig) would otherwise echo its DEBUG records too.
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not any(isinstance(f, HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(HideRunSimulationDeprecation())
    address = ray_address(settings)
    plan = plan_workers(settings, attach_ray(address) if address else None)
    if plan.devices_per_worker != settings.simulation.devices_per_worker:  # the plan follows the cluster
        sim = settings.simulation.model_copy(update={"devices_per_worker": plan.devices_per_worker})
        settings = settings.model_copy(update={"simulation": sim})
    slots = num_slots(settings, plan.devices_per_worker)
    run = FleetRun(settings, run_dir, store_dir, resume=resume, quiet=quiet, expected_slots=slots,
                   on_reply=on_reply, started=started if started is not None else time.perf_counter())
    private_dir = None if address else private_ray_dir()
    try:
        run_simulation(
            server_app=make_server_app(run),
            client_app=client_app,
            num_supernodes=slots,
            backend_name="ray",
            backend_config=backend_config(settings, plan, attached=address is not None, private_dir=private_dir),
        )
    finally:
        if private_dir is not None:
            remove_private_ray_dir(private_dir)
    run.summary |= {"ray": address or "local", "workers": plan.workers, "devices_per_worker": plan.devices_per_worker,
                    "concurrent_devices": plan.concurrent_devices}
    if run.failure:
        raise RunFailed(run.failure, run)
    return run


def write_run_inputs(settings: Settings, run_dir: Path, config_source: Path | None = None,
                     resume: bool = False) -> None:
    """What a run folder records before Ray starts: config.toml (a resumed run keeps its own, rewritten
    only when more rounds were asked for), the data's attribution, the scenario file, inputs.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = run_dir / "config.toml"
    if resume and recorded.is_file():
        previous = load_settings(recorded)
        check_resume_matches(run_dir, previous, settings)
        if previous != settings:  # more rounds: the whole run's settings, not this part's alone
            recorded.write_text(settings_toml(settings))
    else:
        recorded.write_text(settings_toml(settings))
    write_attribution(settings, run_dir)
    if config_source is not None and not resume:
        shutil.copyfile(config_source, run_dir / "scenario.toml")
    record_inputs(settings, run_dir)


def write_attribution(settings: Settings, run_dir: Path) -> Path | None:
    """Write the credit the run's data asks for (CC BY-SA dumps: site, license, changes) beside its
    config.toml; returns the file, or None when the data asks for none."""
    text = attribution_text(settings.population)
    if text is None:
        return None
    path = run_dir / ATTRIBUTION_FILE
    path.write_text(text)
    return path
