"""Adaptive clipping's bit ("unclipped") at the privacy boundary: it leaves a device only through the
one reply builder, only as 0 or 1 (the allow-list, wire.messages.METRIC_RULES) and only in a round
whose Downlink asks for it; the guard refuses anything else. Real Flower Messages."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Message

from clients.guard import privacy_guard
from fedasls.device.faults import FailureCode
from fedasls.federated.strategy import Downlink
from tests.clients.test_guard_attacks import (  # noqa: F401 - task_identity is an autouse fixture
    A,
    B,
    CLIP,
    GLOBAL,
    HONEST,
    context,
    incoming,
    on_the_wire,
    reply_with,
    task_identity,
)
from wire.messages import PrivacyViolation, build_batch_reply, build_reply, downlink_records, read_downlink

UPDATE = {A: np.full((4, 8), 0.01, np.float32), B: np.zeros((6, 4), np.float32)}


def asking(devices: list[int] | None = None) -> Message:
    """A global-adapter round's message whose Downlink asks for the unclipped bit (adaptive clipping)."""
    msg = incoming(devices)
    msg.content["downlink"] = downlink_records(replace(Downlink("global", False, 4, 0, CLIP, dict(GLOBAL)),
                                                       report_unclipped=True))["downlink"]
    return msg


def refused(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == FailureCode.REFUSED


def test_the_downlink_carries_the_request_to_the_device():
    assert read_downlink(asking()).report_unclipped and not read_downlink(incoming()).report_unclipped


@pytest.mark.parametrize("bit", [0, 1])
def test_a_zero_or_one_bit_passes_the_guard_in_a_round_that_asks(bit):
    """Fails if 'unclipped' is taken off the allow-list: the guard would refuse the honest bit."""
    reply = privacy_guard(asking(), context(), reply_with({**HONEST, "unclipped": bit}, UPDATE))
    assert not reply.has_error()
    _, received = on_the_wire(reply)
    assert received.content["metrics"]["unclipped"] == bit


@pytest.mark.parametrize("bad", [2, -1, 0.5, 1.0, 255, 2**40, float("nan")])
def test_any_other_value_is_refused(bad):
    assert refused(privacy_guard(asking(), context(), reply_with({**HONEST, "unclipped": bad}, UPDATE)))
    with pytest.raises(PrivacyViolation, match="unclipped"):  # the one reply builder refuses it too
        build_reply(asking(), {**HONEST, "unclipped": bad})


def test_a_round_that_does_not_ask_gets_no_bit():
    """Without adaptive clipping the bit's count is not noised nor accounted: the guard refuses it."""
    assert refused(privacy_guard(incoming(), context(), reply_with({**HONEST, "unclipped": 1}, UPDATE)))
    assert not privacy_guard(incoming(), context(), reply_with(HONEST, UPDATE)).has_error()


def test_a_batch_reply_holds_one_bit_per_device_each_0_or_1():
    ok = build_batch_reply(asking([4, 9]), [{"device_id": 4, "unclipped": 1}, {"device_id": 9, "unclipped": 0}])
    assert not privacy_guard(asking([4, 9]), context(), lambda m, c: ok).has_error()
    bad = reply_with({"device_id": [4, 9], "unclipped": [1, 3]})
    assert refused(privacy_guard(asking([4, 9]), context(), bad))
    with pytest.raises(PrivacyViolation):
        build_batch_reply(asking([4, 9]), [{"device_id": 4, "unclipped": 1}, {"device_id": 9, "unclipped": 7}])

