"""The metric allow-list (wire.messages.METRIC_RULES) cannot drift from what a device really sends:
every name the device side can build is on it (checked on the source), and real device rounds on the
tiny model (the ClientApp called as Flower calls it, guard included: local, global, a worker slot's
batch, evaluate, and a SecAgg+ round's FitRes) pass it, with honest updates inside the clip norm."""

from __future__ import annotations

import ast
import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app, secagg_train
from clients.guard import check_fitres, round_clip_norm
from fedasls.device.round import DeviceRoundResult
from fedasls.lm.cuts import CutCounts
from fedasls.federated.strategies import FedAvg
from fedasls.lm.adapter_layout import adapter_layout
from server.secagg import fit_ins
from wire.messages import (
    CLIP_TOLERANCE,
    METRIC_RULES,
    allowed_layout,
    check_metrics,
    device_metrics,
    downlink_records,
    read_downlink,
    reply_updates,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 30 * 86400.0


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def test_every_field_and_timed_stage_of_a_device_round_is_on_the_allow_list():
    sent = {f.name for f in fields(DeviceRoundResult)} - {"status", "contribution", "stage_seconds", "cuts"}
    sent |= {"status_code"} | set(CutCounts().metrics())
    assert sent <= set(METRIC_RULES), sent - set(METRIC_RULES)
    timed = set()  # every `stage("<name>")` in the device library and the ClientApp
    for path in [*(ROOT / "fedasls").rglob("*.py"), *(ROOT / "clients").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "stage"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                timed.add(node.args[0].value)
    assert {"train", "worker_setup", "adopt"} <= timed
    missing = {n for n in timed if f"stage_{n}_s" not in METRIC_RULES or f"stage_{n}_cpu_s" not in METRIC_RULES}
    assert not missing, f"add these stages to wire.messages.METRIC_RULES: {missing}"


@pytest.fixture(scope="module")
def settings(make_settings):
    return make_settings(population={"num_devices": 6, "stream_length": 30, "heldout": 2},
                         synthesis={"method": "fallback", "rewrites": 1},
                         adaptation={"epochs": 1, "lora_rank": 4, "min_new_items": 1, "min_items": 2},
                         evaluation={"max_new_tokens": 4}, heterogeneity={"availability": "always"},
                         federated={"strategy": "global", "clip_norm": 1e-3, "cold_adoption": 2})


def message(settings, store: Path, config: dict, clip_norm: float | None = None, kind: str = "train") -> Message:
    """A train (or evaluate) message as the server sends it, with a real round's Downlink when clip_norm is given."""
    records = {"config": ConfigRecord({"settings": settings.model_dump_json(), "store": str(store), "now": NOW,
                                       **config})}
    if clip_norm is not None:
        f = settings.federated.model_copy(update={"clip_norm": clip_norm})
        downlink = FedAvg(f, adapter_layout(settings), settings.adaptation.lora_rank).configure_train(1, [0, 1, 2])
        records |= downlink_records(downlink)
    return Message(RecordDict(records), dst_node_id=1, message_type=kind)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def norm(update) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


def test_real_device_rounds_pass_the_allow_list_and_the_clip_norm(settings, tmp_path):
    store = tmp_path / "store"
    replies = {}
    replies["local"] = app(message(settings, store, {"device-id": 0}), context())
    replies["global"] = app(message(settings, store, {"device-id": 1}, clip_norm=10.0), context())  # not clipped
    replies["batch"] = app(message(settings, store, {"device-ids": [2, 3]}, clip_norm=1e-3), context())  # clipped
    replies["evaluate"] = app(message(settings, store, {"device-id": 1}, clip_norm=1e-3, kind="evaluate"), context())
    for name, reply in replies.items():
        assert not reply.has_error(), (name, reply.error)  # the guard let every honest reply through
        check_metrics(reply.content["metrics"])
    rows = {name: device_metrics(reply) for name, reply in replies.items()}
    assert [r["device_id"] for r in rows["batch"]] == [2, 3]
    assert {"global_rouge1", "global_perplexity"} <= set(rows["evaluate"][0])
    assert math.isnan(rows["local"][0]["epsilon"])  # NaN is legitimate where the list allows it (no DP-SGD)
    local = rows["local"][0]  # the cut counts travel in the real reply (fedasls.lm.cuts): evaluation prompts at least
    assert local["prompts"] > 0 and 0.0 <= local["prompts_cut_share"] <= 1.0 and "answer_tokens_cut_share" in local
    updates = {**reply_updates(replies["global"]), **reply_updates(replies["batch"])}
    assert set(updates) == {1, 2, 3}, "every device trained and sent its update"
    assert 0 < norm(updates[1]) <= 10.0
    for device in (2, 3):  # clipped on the device to 1e-3; the guard's tolerance is for float32 rounding
        assert 0.999e-3 < norm(updates[device]) <= 1e-3 * (1 + CLIP_TOLERANCE)  # it was clipped


def test_a_secagg_round_fitres_passes_the_same_rules(settings, tmp_path):
    """The handler's FitRes in a SecAgg+ round (before secaggplus_mod masks it), on a real device round."""
    plain = message(settings, tmp_path / "store", {"device-id": 4}, clip_norm=1e-3)
    msg = Message(compat.fitins_to_recorddict(fit_ins(plain.content), keep_input=True), dst_node_id=1,
                  message_type="train")
    reply = secagg_train(msg, context())
    check_fitres(reply, allowed_layout(msg), round_clip_norm(msg))
    metrics = dict(reply.content["fitres.metrics"])
    check_metrics(metrics)
    arrays = compat.recorddict_to_fitres(reply.content, keep_input=True).parameters.tensors
    assert arrays and metrics["examples"] > 0
    assert reply.content["fitres.num_examples"]["num_examples"] <= metrics["examples"]


def test_a_round_with_adaptive_clipping_sends_each_device_s_unclipped_bit(settings, tmp_path):
    """Real device rounds whose Downlink asks for adaptive clipping's bit: 1 where the update fit C,
    0 where the device clipped it, through the guard; a round that does not ask sends none."""
    store = tmp_path / "store"

    def asking(config: dict, clip_norm: float) -> Message:
        msg = message(settings, store, config, clip_norm=clip_norm)
        msg.content["downlink"] = downlink_records(replace(read_downlink(msg), report_unclipped=True))["downlink"]
        return msg

    wide, tight = app(asking({"device-id": 1}, 10.0), context()), app(asking({"device-ids": [2, 3]}, 1e-3), context())
    assert not wide.has_error() and not tight.has_error()
    assert device_metrics(wide)[0]["unclipped"] == 1 and 0 < norm(reply_updates(wide)[1]) <= 10.0
    assert [m["unclipped"] for m in device_metrics(tight)] == [0, 0]  # both were clipped to 1e-3
    plain = app(message(settings, store, {"device-id": 4}, clip_norm=10.0), context())
    assert not plain.has_error() and "unclipped" not in device_metrics(plain)[0]


def test_cut_counts_and_shares_pass_the_guard_and_a_bad_share_does_not():
    counts = CutCounts(prompts=10, prompts_cut=3, questions_cut=1, answers=4, answers_cut=1, answer_tokens=900,
                       answer_tokens_cut=120)
    metrics = counts.metrics()
    assert metrics["prompts_cut_share"] == 0.3 and metrics["answer_tokens_cut_share"] == 120 / 900
    check_metrics(metrics)
    check_metrics(CutCounts().metrics())  # nothing fitted: NaN shares are allowed
    from wire.messages import PrivacyViolation

    with pytest.raises(PrivacyViolation, match="answers_cut_share"):
        check_metrics({**metrics, "answers_cut_share": 1.5})
    with pytest.raises(PrivacyViolation, match="prompts_cut"):
        check_metrics({**metrics, "prompts_cut": 0.5})
