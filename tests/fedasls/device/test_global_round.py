"""The device side of a global-adapter round on the tiny real model (plain loop, no Flower)."""

from __future__ import annotations

import pytest
import torch

from fedasls.lm.lora import adapter_state, load_adapter_state
from fedasls.config import Settings
from fedasls.device.device import Device
from fedasls.device.global_round import adapt_from_global, global_model_adapter
from fedasls.federated.strategy import Downlink
from fedasls.privacy.clipping import l2_norm
from fedasls.federated.init import initial_global
from fedasls.lm.adapter_layout import adapter_layout
from fedasls.federated.ranks import lora_kind, truncate
from fedasls.federated.split import shared_part, shared_part_of
from fedasls.device.worker import DeviceRuntime

from tests.settings_update import updated

MAX_RANK = 4


@pytest.fixture(scope="module")
def settings(make_settings) -> Settings:
    return make_settings(
        population={"num_devices": 10, "stream_length": 40, "heldout": 3},
        feedback={"annotation_budget": 4},
        synthesis={"rewrites": 1, "method": "fallback"},
        adaptation={"epochs": 1, "lora_rank": MAX_RANK, "min_new_items": 2, "min_items": 2, "gate": "off"},
        evaluation={"max_new_tokens": 6},
    )


def _downlink(settings, strategy="global", ffa=False, clip_norm=0.05) -> Downlink:
    layout = adapter_layout(settings)
    full = initial_global(layout, seed=5)
    return Downlink(strategy, ffa, MAX_RANK, 5, clip_norm, shared_part(full, shared_part_of(strategy, ffa)))


def test_layout_is_the_devices_adapter_at_the_largest_rank(runtime, settings):
    layout = adapter_layout(settings)
    state = adapter_state(runtime.activate(MAX_RANK, settings.adaptation))
    assert list(layout) == list(state) and all(tuple(state[k].shape) == layout[k] for k in state)


@pytest.mark.parametrize("rank", [2, MAX_RANK])
def test_global_round_contribution_is_padded_clipped_and_in_global_order(runtime, settings, rank):
    downlink = _downlink(settings)
    device = Device(1, runtime, settings, lora_rank=rank)
    device.catch_up()
    c = adapt_from_global(device, downlink)
    assert c is not None and c.examples > 0
    assert list(c.update) == list(downlink.shared)
    assert all(c.update[k].shape == downlink.shared[k].shape for k in c.update)
    assert l2_norm(c.update) <= downlink.clip_norm * (1 + 1e-5) and c.norm > 0
    for key, value in c.update.items():  # rows/columns beyond the device's rank stay zero
        tail = value[rank:, :] if lora_kind(key) == "A" else value[:, rank:]
        assert torch.count_nonzero(tail) == 0
    # the device keeps its fine-tuned copy of the global adapter as its personal model
    assert device.adapter is not None and rank == device.lora_rank


def test_ffa_trains_and_sends_only_b_and_keeps_the_seeded_a(runtime, settings):
    downlink = _downlink(settings, ffa=True)
    assert all(lora_kind(k) == "B" for k in downlink.shared)
    device = Device(2, runtime, settings, lora_rank=2)
    device.catch_up()
    c = adapt_from_global(device, downlink)
    assert c is not None and list(c.update) == list(downlink.shared)
    seeded = truncate(initial_global(adapter_layout(settings), 5), 2)
    for key, value in device.adapter.items():
        if lora_kind(key) == "A":
            assert torch.equal(value, seeded[key])  # frozen
    assert any(torch.count_nonzero(v) for v in c.update.values())
    assert all(p.requires_grad for n, p in runtime.model.named_parameters() if "lora_A" in n and "r2" in n and "-score" not in n)


def test_global_plus_personal_sends_a_and_keeps_its_own_b(runtime, settings):
    downlink = _downlink(settings, strategy="global+personal")
    device = Device(3, runtime, settings, lora_rank=MAX_RANK)
    device.catch_up()
    c = adapt_from_global(device, downlink)
    assert c is not None and all(lora_kind(k) == "A" for k in c.update)
    personal_b = {k: v.clone() for k, v in device.adapter.items() if lora_kind(k) == "B"}
    assert any(torch.count_nonzero(v) for v in personal_b.values())  # B trained, never sent
    # next round: A comes from the new global, B from the device itself
    start = global_model_adapter(device.adapter, downlink)
    assert all(torch.count_nonzero(v) == 0 for k, v in start.items() if lora_kind(k) == "B")
    from fedasls.device.global_round import start_adapter

    again = start_adapter(device.adapter, downlink, device.adapter)
    assert all(torch.equal(again[k], personal_b[k]) for k in personal_b)
    assert all(torch.equal(again[k], downlink.shared[k]) for k in downlink.shared)


def test_shared_part_rules():
    assert shared_part_of("global", False) == "all" and shared_part_of("global", True) == "B"
    assert shared_part_of("global+personal", False) == "A"
    with pytest.raises(ValueError, match="shares no adapter"):
        shared_part_of("local", False)


@pytest.mark.parametrize("contribute", ["trained", "accepted"])
def test_a_rejected_candidate_is_shared_only_under_contribute_trained(runtime, settings, contribute):
    never = settings.model_copy(update={"adaptation": settings.adaptation.model_copy(
        update={"gate": "rouge1", "gate_margin": 10.0, "retry_learning_rates": []})})  # no candidate can win by 10
    downlink = Downlink("global", False, MAX_RANK, 5, 0.05, _downlink(settings).shared, contribute)
    device = Device(4, runtime, never, lora_rank=MAX_RANK)
    device.catch_up()
    c = adapt_from_global(device, downlink)
    assert device.counters.gate_rejected == 1 and device.adapter is None  # the device keeps the base model
    if contribute == "accepted":
        assert c is None
        return
    assert c is not None and c.norm > 0 and list(c.update) == list(downlink.shared)
    step = {k: device.candidate[k] - downlink.shared[k] for k in downlink.shared}  # the rejected candidate's update
    scale = min(1.0, 0.05 / l2_norm(step))
    assert all(torch.allclose(c.update[k], step[k] * scale, atol=1e-7) for k in step)


def _logits(runtime, settings, rank: int, state) -> torch.Tensor:
    model = runtime.activate(rank, settings.adaptation)
    load_adapter_state(model, state)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scaling", ["uniform", "per-rank"])
def test_a_truncated_global_adapter_is_the_same_update_only_under_uniform_scaling(settings, scaling):
    shared = updated(settings, federated={"strategy": "global"})
    chosen = Settings.model_validate(
        {**shared.model_dump(), "adaptation": {**shared.adaptation.model_dump(), "lora_scaling": scaling}}
    )
    runtime = DeviceRuntime(chosen)
    generator = torch.Generator().manual_seed(3)
    full = {k: torch.randn(v.shape, generator=generator) * 0.5
            for k, v in adapter_state(runtime.activate(MAX_RANK, chosen.adaptation)).items()}
    low = 2  # the global adapter's components beyond rank 2 are zero: rank 2 holds all of it
    full = {k: v.clone().index_fill_(0 if lora_kind(k) == "A" else 1, torch.arange(low, MAX_RANK), 0.0)
            for k, v in full.items()}
    server = _logits(runtime, chosen, MAX_RANK, full)
    device = _logits(runtime, chosen, low, truncate(full, low))
    base = _logits(runtime, chosen, MAX_RANK, {k: torch.zeros_like(v) for k, v in full.items()})
    assert not torch.allclose(server, base, atol=1e-3)  # the adapter does change the model
    assert torch.allclose(device, server, atol=1e-4) == (scaling == "uniform")


def test_global_strategies_default_to_uniform_lora_scaling():
    assert Settings().adaptation.lora_scaling == "per-rank"
    for strategy in ("global", "global+personal"):
        chosen = Settings.model_validate({"federated": {"strategy": strategy}})
        assert chosen.adaptation.lora_scaling == "uniform"
        assert chosen.adaptation.alpha_for(4) == chosen.adaptation.lora_alpha * 4 / chosen.adaptation.lora_rank
    explicit = Settings.model_validate({"federated": {"strategy": "global"}, "adaptation": {"lora_scaling": "per-rank"}})
    assert explicit.adaptation.alpha_for(4) == explicit.adaptation.lora_alpha


def test_a_privacy_sweep_of_a_local_scenario_runs_global_with_uniform_scaling():
    from simulations.sweep import point_settings

    point = point_settings(Settings(), noise=1.0)
    assert point.federated.strategy == "global" and point.adaptation.lora_scaling == "uniform"
    kept = Settings.model_validate({"adaptation": {"lora_scaling": "per-rank"}, "federated": {"strategy": "global"}})
    assert point_settings(kept, noise=None).adaptation.lora_scaling == "per-rank"


def _fed_round(runtime, settings, strategy, devices=(5, 6)) -> dict[str, torch.Tensor]:
    """One plain-loop round: the strategy's downlink to fresh devices, their updates aggregated."""
    from fedasls.federated.strategy import Contribution

    downlink = strategy.configure_train(1, list(devices))
    contributions = []
    for d in devices:
        device = Device(d, runtime, settings, lora_rank=MAX_RANK)
        device.catch_up()
        c = adapt_from_global(device, downlink)
        assert c is not None
        contributions.append(Contribution(d, c.update, c.examples))
    strategy.aggregate_train(1, contributions)
    return strategy.adapter


def test_fedprox_with_mu_zero_gives_the_fedavg_global_adapter_bit_for_bit(runtime, settings):
    from fedasls.federated.strategies import FedAvg, FedProx

    shared = updated(settings, federated={"strategy": "global", "proximal_mu": 0.0})
    layout = adapter_layout(shared)
    fedavg = _fed_round(runtime, shared, FedAvg(shared.federated, layout, MAX_RANK))
    fedprox = FedProx(shared.federated, layout, MAX_RANK)
    assert fedprox.configure_train(1, [5]).proximal_mu == 0.0
    initial = {k: v.clone() for k, v in fedprox.adapter.items()}
    prox = _fed_round(runtime, shared, fedprox)
    assert any(not torch.equal(prox[k], initial[k]) for k in initial)  # the round did move the global adapter
    assert list(prox) == list(fedavg) and all(torch.equal(prox[k], fedavg[k]) for k in fedavg)


def test_fedprox_pulls_the_update_toward_the_global_adapter(runtime, settings):
    from dataclasses import replace

    free = replace(_downlink(settings, clip_norm=100.0), proximal_mu=0.0)  # no clipping: compare raw updates
    steps = updated(settings, adaptation={"epochs": 4, "batch_size": 1, "patience": 4})  # the term acts from step 2
    norms = {}
    for mu in (0.0, 1000.0):
        device = Device(7, runtime, steps, lora_rank=MAX_RANK)
        device.catch_up()
        c = adapt_from_global(device, replace(free, proximal_mu=mu))
        assert c is not None and c.clip_factor == 1.0
        norms[mu] = c.norm
    assert 0 < norms[1000.0] < 0.5 * norms[0.0]


def test_fedprox_refuses_device_dp_sgd_which_would_drop_its_term():
    with pytest.raises(ValueError, match="proximal_mu = 0.1 cannot be combined with \\[adaptation\\] dp"):
        Settings.model_validate({"federated": {"strategy": "global", "proximal_mu": 0.1}, "adaptation": {"dp": True}})
    with pytest.raises(ValueError, match="needs strategy = 'global'"):
        Settings.model_validate({"federated": {"proximal_mu": 0.1}})


def test_a_device_past_the_deadline_withholds_its_update_and_the_server_still_classes_it_a_straggler(
        runtime, settings, tmp_path):
    """The same device round three times from a fresh store: without a deadline, with the deadline at
    exactly its simulated duration (it counts: the server keeps finishers with seconds <= deadline), and
    just below it (a straggler: no update leaves, `withheld_bytes` says how much was not sent)."""
    from fedasls.device.round import run_device_round
    from fedasls.device.store import DeviceStore
    from fedasls.sim.cost_model import CostModel
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from fedasls.sim.simulated_timing import SimulatedTiming
    from server.coordinator import Coordinator
    from wire.messages import check_metrics

    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    timing = SimulatedTiming(hetero, CostModel(settings.cost))
    downlink = _downlink(settings)
    now = 9 * 86400.0  # the device's stream has begun

    def run(folder: str, deadline: float | None):
        withhold = None if deadline is None else timing.past_deadline(0, deadline)
        return run_device_round(0, now, runtime, settings, DeviceStore(tmp_path / folder), hetero,
                                downlink=downlink, withhold=withhold)

    full = run("free", None)
    assert full.contribution is not None and full.withheld_bytes == 0
    seconds = timing.seconds(0, full.work.cost_work())
    on_time, late = run("on-time", seconds), run("late", seconds * (1 - 1e-9))
    assert on_time.contribution is not None and on_time.withheld_bytes == 0
    size = sum(t.numel() * t.element_size() for t in full.contribution.update.values())
    assert late.contribution is None and late.withheld_bytes == size > 10_000
    assert late.upload_bytes == full.upload_bytes  # the round's timing still counts the upload
    assert timing.seconds(0, late.work.cost_work()) == seconds
    check_metrics(late.metrics())  # a reply without the update is a valid, guarded reply
    for deadline, role in ((seconds, "completed"), (seconds * (1 - 1e-9), "straggler")):
        coordinator = Coordinator(population_size=1, heterogeneity=hetero, cohort_size=1, deadline_s=deadline,
                                  simulated_availability=False)
        assert coordinator.sample(now) == [0]
        outcome = coordinator.close_round(now, {0: seconds})
        assert (outcome.completed, outcome.stragglers) == (([0], []) if role == "completed" else ([], [0]))
