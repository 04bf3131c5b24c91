"""SecAgg+ refusals are counted per stage, in a real Flower simulation: a device whose privacy guard
refuses its reply in the protocol's setup or share-keys stage is a "refused" failure, as in a plain
round (not a device that was merely unreachable), and every stage's refusals are in the round row.

The ClientApp here is the real one plus a mod, inside the guard, that plants a canary in one
SuperNode's reply per stage (partition 0: its setup public key; 1: an extra encrypted share; 4: an
extra unmask share), standing in for a compromised secaggplus_mod. 6 devices, 5 sampled on 5 slots;
a reconstruction threshold of 2 lets the other three finish the round.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from clients.app import query, secagg_route, train
from clients.guard import privacy_guard
from wire.messages import SECAGG_CONFIGS, secagg_stage
from server.rounds import FleetRun
from tests.recording_grid import run_recorded
from tests.server.test_secagg import settings_for, write_users

pytestmark = pytest.mark.integration  # a real SecAgg+ run on Flower (module fixture)

SLOTS = 5
CANARY = b"CANARY07X001QZ"


def plant(msg: Message, context: Context, call_next) -> Message:
    """Inside the guard: add a canary to partition 0's setup, 1's share-keys and 4's unmask reply."""
    stage, reply = secagg_stage(msg), call_next(msg, context)
    part = int(context.node_config.get("partition-id", -1))
    if reply.has_error() or stage is None:
        return reply
    configs = reply.content[SECAGG_CONFIGS]
    if stage == Stage.SETUP and part == 0:
        configs[Key.PUBLIC_KEY_1] = configs[Key.PUBLIC_KEY_1] + CANARY
    elif stage == Stage.SHARE_KEYS and part == 1:
        configs[Key.DESTINATION_LIST] = [*configs[Key.DESTINATION_LIST], 99]
        configs[Key.CIPHERTEXT_LIST] = [*configs[Key.CIPHERTEXT_LIST], CANARY]
    elif stage == Stage.UNMASK and part == 4:
        configs[Key.NODE_ID_LIST] = [*configs[Key.NODE_ID_LIST], 99]
        configs[Key.SHARE_LIST] = [*configs[Key.SHARE_LIST], CANARY]
    return reply


planted = ClientApp(mods=[privacy_guard, plant])
planted.train(mods=[secagg_route])(train)
planted.query()(query)


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-refused")
    write_users(root / "users.jsonl")
    settings = settings_for(tiny_model_dir, root / "users.jsonl", "secagg+")
    settings = settings.model_copy(update={"federated": settings.federated.model_copy(
        update={"secagg_reconstruction_threshold": 2})})
    run = FleetRun(settings, root / "run", root / "run" / "store", quiet=True, expected_slots=SLOTS)
    return run, run_recorded([("secagg+", run)], SLOTS, app=planted)


def test_a_refusal_in_any_secagg_stage_is_counted_and_no_canary_reaches_the_server(recorded):
    run, received = recorded
    row = json.loads((run.run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert (row["secagg_refused_setup"], row["secagg_refused_share_keys"], row["secagg_refused_collect_masked_vectors"],
            row["secagg_refused_unmask"]) == (1, 1, 0, 1)
    assert row["failed_refused"] == 2 and row["failed"] == 2  # the two that never trained: refused, as in plain rounds
    devices = [json.loads(line) for line in (run.run_dir / "device_rounds.jsonl").read_text().splitlines()]
    assert sorted(r["failure"] for r in devices if r["failure"]) == ["refused", "refused"]
    assert row["secagg_ok"] == 1 and row["completed"] == 3  # the others finished; one unmask share was refused
    assert not any(CANARY in wire for _, wire, _ in received)
