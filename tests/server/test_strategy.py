"""Round strategies on real Flower records: FedAvg of replies, DP-FedAvg, stop rule, exact resume."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from wire.messages import GLOBAL_ADAPTER_KEY, build_reply
from fedasls.config import Settings
from fedasls.privacy.user_level import UserLevelAccountant
from fedasls.federated.fedavg import fedavg
from server.strategy import DPFedAvg, GlobalAdapterStrategy, LocalStrategy, make_strategy


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
    downlink = strategy.configure(server_round)
    out = []
    for d in devices:
        msg = Message(RecordDict({"config": ConfigRecord({"device-id": d}), **downlink}), dst_node_id=1,
                      message_type="train")
        gen = torch.Generator().manual_seed(100 * server_round + d)
        update = {k: torch.randn(a.shape, generator=gen) * scale for k, a in downlink[GLOBAL_ADAPTER_KEY].items()}
        out.append(build_reply(msg, {"device_id": d, "examples": d + 1}, update))
    return out


def test_local_sends_nothing(tiny_model_dir):
    assert isinstance(make_strategy(settings(tiny_model_dir), 0.1, 10), LocalStrategy)
    assert LocalStrategy().configure(1) == {}


def test_fedavg_weights_by_examples_and_counts_only_completed_devices(tiny_model_dir):
    strategy = make_strategy(settings(tiny_model_dir, strategy="global"), 0.1, 10)
    assert isinstance(strategy, GlobalAdapterStrategy)
    before = {k: v.clone() for k, v in strategy.adapter.items()}
    got = replies(strategy, 1, [0, 1, 2])
    metrics = strategy.aggregate(1, got, completed=[2, 0])  # device 1 was a straggler
    assert metrics["contributors"] == 2
    ups = [r.content["global-update"].to_torch_state_dict() for r in got]
    expected = fedavg([ups[2], ups[0]], [3, 1])
    assert all(torch.allclose(strategy.adapter[k], before[k] + expected[k]) for k in before)


def test_dp_wrapper_noises_accounts_and_stops_before_the_target(tiny_model_dir):
    s = settings(tiny_model_dir, strategy="global", dp=True, noise_multiplier=1.0, clip_norm=0.5, target_epsilon=5.5)
    strategy = make_strategy(s, 0.3, 3.0)
    assert isinstance(strategy, DPFedAvg)
    reference = UserLevelAccountant(1.0, 1e-5)
    rounds = 0
    while strategy.stop_reason() is None:
        rounds += 1
        m = strategy.aggregate(rounds, replies(strategy, rounds, [0, 1, 2]), completed=[0, 1, 2])
        reference.compose(0.3)
        assert m["user_epsilon"] == pytest.approx(reference.epsilon()) and m["user_epsilon"] <= 5.5
    assert reference.epsilon_after(0.3) > 5.5 and "above the target 5.5" in strategy.stop_reason()
    assert rounds == 4  # epsilon 3.29, 4.24, 4.91, 5.46; the 5th round would give 5.94


def test_resume_gives_the_same_global_adapter_and_epsilon(tiny_model_dir, tmp_path):
    s = settings(tiny_model_dir, strategy="global+personal", dp=True, noise_multiplier=0.7, clip_norm=0.2)
    straight = make_strategy(s, 0.2, 3.0)
    for r in (1, 2, 3):
        straight.aggregate(r, replies(straight, r, [0, 1, 2, 3]), completed=[0, 1, 3])
    first = make_strategy(s, 0.2, 3.0)
    for r in (1, 2):
        first.aggregate(r, replies(first, r, [0, 1, 2, 3]), completed=[0, 1, 3])
    saved = first.state(2, tmp_path)
    first.aggregate(3, replies(first, 3, [0, 1]), completed=[0])  # work after the checkpoint, then a "kill"
    resumed = make_strategy(s, 0.2, 3.0)
    resumed.load_state(saved, tmp_path)
    resumed.aggregate(3, replies(resumed, 3, [0, 1, 2, 3]), completed=[0, 1, 3])
    assert list(resumed.inner.adapter) == list(straight.inner.adapter)
    assert all(torch.equal(resumed.inner.adapter[k], straight.inner.adapter[k]) for k in straight.inner.adapter)
    assert resumed.accountant.epsilon() == straight.accountant.epsilon()
    assert (tmp_path / "privacy.json").is_file()
