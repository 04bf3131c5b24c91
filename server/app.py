"""Flower ServerApp: the fleet coordinator.

`make_server_app(run)` serves `fedasls simulate` (settings already loaded); the module-level `app`
serves `flwr run .`, reading the scenario named in the run config (`[tool.flwr.app.config]`).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedasls.config import ConfigError, Settings, load_settings
from server.checkpoint import FAILURE_FILE, RunFailed
from server.rounds import FleetRun, run_fleet
from fedasls.scenarios import scenario_path  # the scenario files ship as fedasls package data


def make_server_app(run: FleetRun) -> ServerApp:
    """A ServerApp that runs the fleet loop for an already-configured run."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fleet(grid, run)

    return server_app


def fleet_run_from_config(run_config: dict) -> FleetRun:
    """A FleetRun from Flower run-config keys: `scenario` (name or TOML path), `output-dir`, `fleet`
    ("slots": SuperNodes are worker slots, the default; "nodes": one SuperNode per device)."""
    settings: Settings = load_settings(scenario_path(str(run_config.get("scenario", "quickstart"))))
    out = Path(str(run_config.get("output-dir") or settings.simulation.output_dir))
    run_dir = out.resolve() / time.strftime("flwr-run-%Y%m%d-%H%M%S")
    fleet = str(run_config.get("fleet", "slots"))
    if fleet not in ("slots", "nodes"):
        raise ConfigError(f"run config fleet='{fleet}': use 'slots' (simulation) or 'nodes' (one SuperNode per device)")
    return FleetRun(settings, run_dir, Path(settings.simulation.store_dir or run_dir / "store"), fleet=fleet)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = fleet_run_from_config(dict(context.run_config))
    summary = run_fleet(grid, run)
    if run.failure:  # too many device rounds failed: the run ends as failed, saying why
        (run.run_dir / FAILURE_FILE).write_text(run.failure + "\n")  # flwr run exits 0 whatever the ServerApp raised
        raise RunFailed(run.failure, run)
    print(f"fedasls: {summary['rounds']} rounds on {summary['fleet']} fleet ({summary}); results in {run.run_dir}; "
          f"tables and plots: fedasls report {run.run_dir}")
