"""The round strategy on real Flower records: the Downlink encoded and read back, replies decoded into
contributions, FedAvg of them, DP-FedAvg, stop rule, exact resume."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from wire.messages import GLOBAL_ADAPTER_KEY, build_reply, downlink_records, read_downlink
from fedasls.config import Settings
from fedasls.federated.fedavg import fedavg
from fedasls.federated.strategies import FedAvg, FedProx, LocalStrategy
from fedasls.privacy.dp_fedavg import DPFedAvg
from fedasls.privacy.secrets import DpSecrets
from fedasls.privacy.user_level import UserLevelAccountant
from server.secagg import fit_ins
from server.strategy import completed_contributions, make_strategy


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def settings(tiny_model_dir, **federated) -> Settings:
    sampling = "poisson" if federated.get("dp") else "available"
    return Settings.model_validate({"model": {"path": str(tiny_model_dir)}, "adaptation": {"lora_rank": 4},
                                    "simulation": {"sampling": sampling}, "federated": federated})


def replies(strategy, server_round: int, devices: list[int], scale: float = 0.01) -> list[Message]:
    """Each device replies to the round's downlink with a seeded update of the global layout."""
    downlink = downlink_records(strategy.configure_train(server_round, devices))
    out = []
    for d in devices:
        msg = Message(RecordDict({"config": ConfigRecord({"device-id": d}), **downlink}), dst_node_id=1,
                      message_type="train")
        gen = torch.Generator().manual_seed(100 * server_round + d)
        update = {k: torch.randn(a.shape, generator=gen) * scale for k, a in downlink[GLOBAL_ADAPTER_KEY].items()}
        out.append(build_reply(msg, {"device_id": d, "examples": d + 1}, update))
    return out


def aggregate(strategy, server_round: int, got: list[Message], completed: list[int]) -> dict[str, float]:
    return strategy.aggregate_train(server_round, completed_contributions(got, completed))


def test_the_device_reads_every_knob_of_the_downlink_plain_and_as_secagg_fitins(tiny_model_dir):
    strategy = make_strategy(settings(tiny_model_dir, strategy="global", ffa=True, seed=9, clip_norm=0.3,
                                      contribute="accepted", cold_adoption=2, proximal_mu=0.25), 0.1, 10)
    assert isinstance(strategy, FedProx)
    sent = strategy.configure_train(1, [3])
    content = RecordDict({"config": ConfigRecord({"device-id": 3}), **downlink_records(sent)})
    plain = Message(content, dst_node_id=1, message_type="train")
    secagg = Message(compat.fitins_to_recorddict(fit_ins(content), keep_input=True), dst_node_id=1,
                     message_type="train")
    for msg in (plain, secagg):
        got = read_downlink(msg)
        assert {f.name: getattr(got, f.name) for f in fields(got) if f.name != "shared"} == {
            "strategy": "global", "ffa": True, "max_rank": 4, "seed": 9, "clip_norm": 0.3, "contribute": "accepted",
            "cold_adoption": 2, "proximal_mu": 0.25, "report_unclipped": False}
        assert list(got.shared) == list(sent.shared)
        assert all(torch.equal(got.shared[k], sent.shared[k]) for k in sent.shared)
    assert read_downlink(Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")) is None


def test_local_sends_nothing(tiny_model_dir):
    assert isinstance(make_strategy(settings(tiny_model_dir), 0.1, 10), LocalStrategy)
    assert LocalStrategy().configure_train(1, [0, 1]) is None


def test_fedavg_weights_by_examples_and_counts_only_completed_devices(tiny_model_dir):
    strategy = make_strategy(settings(tiny_model_dir, strategy="global"), 0.1, 10)
    assert type(strategy) is FedAvg
    before = {k: v.clone() for k, v in strategy.adapter.items()}
    got = replies(strategy, 1, [0, 1, 2])
    metrics = aggregate(strategy, 1, got, completed=[2, 0])  # device 1 was a straggler
    assert metrics["contributors"] == 2
    ups = [r.content["global-update"].to_torch_state_dict() for r in got]
    expected = fedavg([ups[2], ups[0]], [3, 1])
    assert all(torch.allclose(strategy.adapter[k], before[k] + expected[k]) for k in before)


def test_dp_wrapper_noises_accounts_and_stops_before_the_target(tiny_model_dir):
    s = settings(tiny_model_dir, strategy="global", dp=True, noise_multiplier=1.0, clip_norm=0.5, target_epsilon=5.5)
    strategy = make_strategy(s, 0.3, 3.0, DpSecrets.fresh())
    assert isinstance(strategy, DPFedAvg)
    reference = UserLevelAccountant(1.0, 1e-5)
    rounds = 0
    while strategy.stop_reason() is None:
        rounds += 1
        m = aggregate(strategy, rounds, replies(strategy, rounds, [0, 1, 2]), completed=[0, 1, 2])
        reference.compose(0.3)
        assert m["user_epsilon"] == pytest.approx(reference.epsilon()) and m["user_epsilon"] <= 5.5
    assert reference.epsilon_after(0.3) > 5.5 and "above the target 5.5" in strategy.stop_reason()
    assert rounds == 5  # PLD epsilon 2.92, 3.70, 4.28, 4.76, 5.20; the 6th round would give 5.59


def test_resume_gives_the_same_global_adapter_and_epsilon(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, strategy="global+personal", dp=True, noise_multiplier=0.7, clip_norm=0.2)
    secrets = DpSecrets.fresh()  # what server-private.json keeps for the run
    straight = make_strategy(s, 0.2, 3.0, secrets)
    for r in (1, 2, 3):
        aggregate(straight, r, replies(straight, r, [0, 1, 2, 3]), completed=[0, 1, 3])
    first = make_strategy(s, 0.2, 3.0, secrets)
    for r in (1, 2):
        aggregate(first, r, replies(first, r, [0, 1, 2, 3]), completed=[0, 1, 3])
    saved = first.state(2, tmp_path)
    aggregate(first, 3, replies(first, 3, [0, 1]), completed=[0])  # work after the checkpoint, then a "kill"
    resumed = make_strategy(s, 0.2, 3.0, secrets)
    resumed.load_state(saved, tmp_path)
    aggregate(resumed, 3, replies(resumed, 3, [0, 1, 2, 3]), completed=[0, 1, 3])
    assert list(resumed.inner.adapter) == list(straight.inner.adapter)
    assert all(torch.equal(resumed.inner.adapter[k], straight.inner.adapter[k]) for k in straight.inner.adapter)
    assert resumed.accountant.epsilon() == straight.accountant.epsilon()
    assert (tmp_path / "privacy.json").is_file()
