"""Phase 2 of a two-phase round through the real ClientApp (its privacy guard included): a device
sends the update it kept for exactly the round token it is asked about, checked like any update
(layout, finite, clip_norm); a device that holds none for that token (another round, an earlier
attempt of a resumed round, state lost) answers NO_KEPT_UPDATE."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app
from fedasls.device import kept_update
from fedasls.device.faults import FailureCode
from fedasls.device.store import DeviceStore
from fedasls.federated.strategy import Downlink
from wire.messages import (FETCH_UPDATE, GLOBAL_ADAPTER_KEY, allowed_layout, device_failures, fetch_records,
                           reply_updates)

A, B = "m.q_proj.lora_B.weight", "m.q_proj.lora_A.weight"  # not in name order: the order must survive the keep
GLOBAL = {A: torch.zeros(4, 8), B: torch.zeros(6, 4)}
CLIP = 1.0


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def fetch(store: DeviceStore, token: str, devices: list[int]) -> Message:
    """The server's phase-2 message (as server/rounds.py builds it) run through the ClientApp."""
    ids = {"device-id": devices[0]} if len(devices) == 1 else {"device-ids": devices, "parallel": 1}
    config = ConfigRecord({**ids, "server-round": 2, "store": str(store.root), FETCH_UPDATE: token})
    records = {"config": config, **fetch_records(Downlink("global", False, 4, 0, CLIP, dict(GLOBAL)))}
    return run(records)


def run(records: dict) -> Message:
    msg = Message(RecordDict(records), dst_node_id=1, message_type="train")
    return app(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


def update(norm: float, shape_b: tuple[int, int] = (6, 4)) -> dict[str, torch.Tensor]:
    n = 32 + shape_b[0] * shape_b[1]
    return {A: torch.full((4, 8), norm / math.sqrt(n)), B: torch.full(shape_b, norm / math.sqrt(n))}


def test_a_device_sends_the_update_it_kept_for_this_round_token_once(tmp_path):
    store, token = DeviceStore(tmp_path), kept_update.round_token(2)
    kept = update(0.5)
    assert kept_update.keep(store.folder(3), token, kept) == (32 + 24) * 4
    reply = fetch(store, token, [3])
    assert not reply.has_error() and set(reply.content.keys()) == {"metrics", "global-update"}
    assert dict(reply.content["metrics"]) == {"device_id": 3}
    got = reply_updates(reply)[3]
    assert list(got) == [A, B] and all(torch.equal(got[k], kept[k]) for k in kept)
    assert fetch(store, token, [3]).error.code == FailureCode.NO_KEPT_UPDATE  # sent once, then gone


def test_an_update_kept_for_another_round_or_attempt_is_never_sent(tmp_path):
    store = DeviceStore(tmp_path)
    stale = kept_update.round_token(2)  # e.g. the attempt of round 2 that a kill interrupted
    kept_update.keep(store.folder(3), stale, update(0.5))
    for token in (kept_update.round_token(2), kept_update.round_token(3)):  # the resumed attempt, a later round
        reply = fetch(store, token, [3])
        assert reply.has_error() and reply.error.code == FailureCode.NO_KEPT_UPDATE
        assert reply.error.reason == FailureCode.NO_KEPT_UPDATE.message
    kept_update.keep(store.folder(3), kept_update.round_token(3), update(0.5))  # a new round's keep drops it
    assert fetch(store, stale, [3]).error.code == FailureCode.NO_KEPT_UPDATE


def test_the_guard_checks_a_phase_two_update_as_any_update(tmp_path):
    store, token = DeviceStore(tmp_path), kept_update.round_token(2)
    kept_update.keep(store.folder(3), token, update(8e5))  # not clipped to clip_norm 1
    assert fetch(store, token, [3]).error.code == FailureCode.REFUSED
    kept_update.keep(store.folder(3), token, update(0.5, shape_b=(6, 5)))  # not the global adapter's layout
    assert fetch(store, token, [3]).error.code == FailureCode.REFUSED
    kept_update.keep(store.folder(3), token, {k: v * math.nan for k, v in update(0.5).items()})
    assert fetch(store, token, [3]).error.code == FailureCode.REFUSED


def test_phase_two_sends_the_layout_not_the_tensors_and_the_layout_binds_only_phase_two(tmp_path):
    store, token = DeviceStore(tmp_path), kept_update.round_token(2)
    records = fetch_records(Downlink("global", False, 4, 0, CLIP, dict(GLOBAL)))
    assert GLOBAL_ADAPTER_KEY not in records  # the devices hold the tensors since phase 1
    ids = {"device-id": 3, "server-round": 2, "store": str(store.root)}

    def message(config: dict, layout: dict) -> Message:
        return Message(RecordDict({"config": ConfigRecord(config), **layout}), dst_node_id=1, message_type="train")

    assert allowed_layout(message({**ids, FETCH_UPDATE: token}, records)) == {A: (4, 8), B: (6, 4)}  # in order
    assert allowed_layout(message(ids, records)) is None  # outside phase 2 a layout record opens nothing
    # the guard checks the kept update against the layout the message names
    other = fetch_records(Downlink("global", False, 4, 0, CLIP, {A: torch.zeros(4, 8), B: torch.zeros(6, 5)}))
    kept_update.keep(store.folder(3), token, update(0.5))
    assert run({"config": ConfigRecord({**ids, FETCH_UPDATE: token}), **other}).error.code == FailureCode.REFUSED
    kept_update.keep(store.folder(3), token, update(0.5))  # (the refused reply took it)
    assert not run({"config": ConfigRecord({**ids, FETCH_UPDATE: token}), **records}).has_error()


def test_a_worker_slot_sends_the_kept_updates_and_names_the_devices_that_hold_none(tmp_path):
    store, token = DeviceStore(tmp_path), kept_update.round_token(2)
    kept_update.keep(store.folder(4), token, update(0.25))
    reply = fetch(store, token, [4, 9])
    assert not reply.has_error()
    assert set(reply_updates(reply)) == {4}
    assert device_failures(reply) == {9: FailureCode.NO_KEPT_UPDATE}


def test_a_round_token_cannot_name_another_file(tmp_path):
    with pytest.raises(ValueError, match="round token"):
        kept_update.take(tmp_path, "../state")
