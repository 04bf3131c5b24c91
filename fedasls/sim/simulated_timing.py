"""Simulation-only timing: how long a device's reported work takes, and whether it stays online.

A real device only reports the work it did (`fedasls.sim.cost_model.RoundWork`). In a simulation
the fleet turns that work into simulated seconds with the cost model and the device's
heterogeneity profile, and decides from its availability window whether it finished online (a
device that goes offline mid-round loses that round's work). Both halves of the simulated fleet
(the worker that runs the device, the server that closes the round) use this one model, so they
agree on every duration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fedasls.sim.cost_model import CostModel, RoundWork
from fedasls.sim.heterogeneity import HeterogeneityModel


@dataclass
class SimulatedTiming:
    """Cost model + availability of a simulated population."""

    heterogeneity: HeterogeneityModel
    cost: CostModel = field(default_factory=CostModel)

    def seconds(self, device_id: int, work: Mapping[str, float]) -> float:
        """Simulated seconds device `device_id` spends on `work` (keys of cost_model.WORK_KEYS)."""
        return self.cost.round_seconds(self.heterogeneity.profile(device_id), dict(work))

    def finishes_online(self, device_id: int, now: float, seconds: float) -> bool:
        """Whether the device is online at `now` and its availability window lasts `seconds` more."""
        availability = self.heterogeneity.profile(device_id).availability
        return availability.is_available(now) and availability.next_change(now) >= now + seconds

    def past_deadline(self, device_id: int, deadline_s: float) -> Callable[[RoundWork], bool]:
        """The device round's `withhold` rule: True when the round's work (its update's upload included)
        takes longer than `deadline_s`, so the server will class it a straggler (server.coordinator keeps
        only finishers with seconds <= deadline) and the device should not upload its update. 0 = no deadline."""
        return lambda work: deadline_s > 0 and self.seconds(device_id, work.cost_work()) > deadline_s

    def keep_if_online(self, device_id: int, now: float) -> Callable[[RoundWork], bool]:
        """The device round's `keep` rule in a simulation: keep the state only if it finished online."""
        return lambda work: self.finishes_online(device_id, now, self.seconds(device_id, work.cost_work()))
