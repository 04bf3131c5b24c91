"""The round strategy on Flower: build the run's strategy, decode replies into contributions.

The strategies are Flower-free (fedasls.federated.strategy: the protocol; fedasls.federated.strategies:
local, FedAvg, FedProx; fedasls.privacy.dp_fedavg: the DP-FedAvg wrapper). This module only turns
Flower replies into `Contribution`s; wire/messages.py encodes a `Downlink` into records
(`downlink_records`) and the device reads it back (`read_downlink`). (Flower's own strategies run
their own round loop and draw unseeded noise, so they do not fit a loop with a virtual clock and
exact resume.)
"""

from __future__ import annotations

from flwr.app import Message

from wire.messages import device_metrics, reply_updates
from fedasls.config import Settings
from fedasls.federated.strategies import LocalStrategy, make_global_strategy
from fedasls.federated.strategy import Contribution, Strategy
from fedasls.privacy.dp_fedavg import DPFedAvg
from fedasls.privacy.secrets import DpSecrets
from server.fleets import Dispatched


def make_strategy(settings: Settings, sample_rate: float, expected_cohort: float,
                  secrets: DpSecrets | None = None) -> Strategy:
    """The strategy [federated] asks for (DP-FedAvg wraps the global-adapter strategy when dp = true,
    with the run's secret randomness: server/private_state.py)."""
    f = settings.federated
    if f.strategy == "local":
        return LocalStrategy()
    # Here, not at the top: the layout needs peft and the model's config, which a driver running
    # only local personalization never imports (it starts faster without them).
    from fedasls.lm.adapter_layout import adapter_layout

    inner = make_global_strategy(f, adapter_layout(settings), settings.adaptation.lora_rank)
    if not f.dp:
        return inner
    if secrets is None:
        raise ValueError("a DP strategy needs the run's secrets (server.private_state.dp_secrets)")
    caveats = []
    if f.secure_aggregation != "none":
        caveats.append(
            f"SecAgg+: the noise is scaled to the quantized sum's sensitivity (clip_norm x (1 + 2 sqrt(d) / "
            f"{f.secagg_quantization_range})); a round whose Poisson cohort exceeds the worker slots stops the run "
            f"(probability <= {f.secagg_slot_tail:g} a round), which adds at most (1 + e^epsilon) x rounds x "
            f"{f.secagg_slot_tail:g} to delta")
    return DPFedAvg(inner, f, sample_rate, expected_cohort, secrets, planned_rounds=settings.simulation.rounds,
                    caveats=caveats)


def completed_contributions(replies: list[Message], completed: list[int]) -> list[Contribution]:
    """The contributions of completed devices that sent an update, in `completed` order; weight =
    the device's training examples."""
    by_device: dict[int, Contribution] = {}
    for reply in replies:
        updates = reply_updates(reply)  # one device's reply, or a worker slot's batch
        if not updates:
            continue
        metrics = {int(m["device_id"]): m for m in device_metrics(reply)}
        by_device |= {d: Contribution(d, update, float(metrics[d]["examples"]), metrics[d])
                      for d, update in updates.items()}
    return [by_device[d] for d in completed if d in by_device]


def fetched_contributions(results: dict[int, dict], updates: dict[int, dict], completed: list[int]
                          ) -> list[Contribution]:
    """A two-phase round's contributions (server/rounds.py): the phase-2 `updates` with the phase-1
    metrics of the same devices, exactly as `completed_contributions` builds them from one-phase replies."""
    out = []
    for d in completed:
        if d in updates:
            metrics = {k: v for k, v in results[d].items() if k != "device_seconds"}
            out.append(Contribution(d, updates[d], float(metrics["examples"]), metrics))
    return out


def round_contributions(sent: Dispatched, completed: list[int]) -> tuple[list[Contribution], dict[str, float]]:
    """What the round strategy aggregates: the completed devices' decoded updates, or (secure
    aggregation) the aggregate its round recovered; and the transport's figures for the round row."""
    if sent.secure is not None:
        return sent.secure.contributions(completed)
    return completed_contributions(sent.replies, completed), {}
