"""Real simulations for the privacy tests: a grid that keeps the wire bytes of every reply the
server receives, and one Simulation Engine run that serves several fleet runs in turn."""

from __future__ import annotations

from flwr.app import Context
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from clients.app import app as client_app
from server.rounds import FleetRun, run_fleet
from simulations.runner import backend_config, plan_workers


class RecordingGrid:
    """The real grid, passing every call through; keeps the wire bytes of every pulled reply."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.received: list[tuple[str, bytes, object]] = []
        self.mode = ""

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self.received.append((self.mode, message_to_proto(reply).SerializeToString(), reply))
        return replies


def run_recorded(runs: list[tuple[str, FleetRun]], supernodes: int, app=client_app) -> list[tuple[str, bytes, object]]:
    """Run each (name, run) in turn through one ServerApp on Flower's Simulation Engine (Ray, the real
    ClientApp, or `app`); return (name, wire bytes, message) for every reply the server received."""
    server_app = ServerApp()
    tapped: dict[str, RecordingGrid] = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        recording = RecordingGrid(grid)
        tapped["grid"] = recording
        for name, run in runs:
            recording.mode = name
            run_fleet(recording, run)

    settings = runs[0][1].settings
    run_simulation(server_app=server_app, client_app=app, num_supernodes=supernodes, backend_name="ray",
                   backend_config=backend_config(settings, plan_workers(settings)))
    return tapped["grid"].received
