"""The privacy boundary on the device: the ClientApp mod that refuses any reply holding anything
but what `wire.messages.build_reply` / `build_fit_reply` may build.

A reply may carry one MetricRecord of scalar numbers and, in a global-adapter round, the device's
update with exactly the names, order, shapes and dtype of the global adapter it received; under
SecAgg+ each protocol stage's records only; an error reply only a FailureCode with its fixed
message. The guard catches whatever the app raises, so Flower never sees an exception from a device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import Code, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedasls.device.faults import DeviceFailure, FailureCode
from wire.messages import (
    ALLOWED_KEYS,
    FITRES_EXAMPLES,
    FITRES_METRICS,
    FITRES_PARAMS,
    FITRES_STATUS,
    GLOBAL_UPDATE_KEY,
    METRICS_KEY,
    SECAGG_CONFIGS,
    Layout,
    PrivacyViolation,
    allowed_layout,
    batch_update_device,
    check_update_layout,
    error_reply,
    secagg_stage,
)


# What each SecAgg+ stage's reply may hold in its protocol record: key -> (is a list, element type).
_SECAGG_REPLY_KEYS: dict[str, dict[str, tuple[bool, type]]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: (False, bytes), Key.PUBLIC_KEY_2: (False, bytes)},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: (True, int), Key.CIPHERTEXT_LIST: (True, bytes)},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: (True, bytes)},
    Stage.UNMASK: {Key.NODE_ID_LIST: (True, int), Key.SHARE_LIST: (True, bytes)},
}
_FITRES_RECORDS = frozenset({FITRES_METRICS, FITRES_EXAMPLES, FITRES_PARAMS, FITRES_STATUS})


def check_secagg_reply(reply: Message, stage: str, allowed: Layout | None) -> None:
    """Raise PrivacyViolation unless a SecAgg+ reply holds only what its stage sends: the protocol
    record with that stage's keys (public keys, encrypted shares, key shares: bytes made by Flower's
    mod), and in the masked-vector stage also the masked vector (integer arrays: the weight factor,
    then exactly the global adapter's shapes), numbers-only metrics, the weight, an OK status and an
    emptied parameters record. (Error replies are checked by `check_reply`.)"""
    content = reply.content
    expected = {SECAGG_CONFIGS} | (_FITRES_RECORDS if stage == Stage.COLLECT_MASKED_VECTORS else set())
    if set(content.keys()) != expected:
        raise PrivacyViolation(f"SecAgg+ {stage} reply holds records {sorted(content.keys())}, expected "
                               f"{sorted(expected)}")
    configs = content[SECAGG_CONFIGS]
    spec = _SECAGG_REPLY_KEYS.get(stage)
    if spec is None or not isinstance(configs, ConfigRecord) or set(configs.keys()) != set(spec):
        raise PrivacyViolation(f"SecAgg+ {stage} reply holds protocol keys {sorted(configs.keys())}")
    for key, (is_list, kind) in spec.items():
        values = configs[key] if is_list else [configs[key]]
        if not isinstance(values, list) or any(type(v) is not kind for v in values):
            raise PrivacyViolation(f"SecAgg+ {stage} reply: '{key}' must be {'a list of ' if is_list else ''}"
                                   f"{kind.__name__}")
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return
    if allowed is None:
        raise PrivacyViolation("a masked vector may only answer a SecAgg+ round that sent the global adapter")
    masked = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    shapes = [tuple(a.shape) for a in masked]
    if shapes != [(1,), *allowed.values()] or any(not np.issubdtype(a.dtype, np.integer) for a in masked):
        raise PrivacyViolation(f"the masked vector's arrays {shapes[:3]}... are not the weight factor and the global "
                               "adapter's shapes (integers)")
    metrics = content[FITRES_METRICS]
    if not isinstance(metrics, ConfigRecord) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in metrics.values()):
        raise PrivacyViolation("SecAgg+ metrics must be scalar numbers")
    examples = content[FITRES_EXAMPLES]
    if not isinstance(examples, MetricRecord) or set(examples.keys()) != {"num_examples"}:
        raise PrivacyViolation("SecAgg+ weight record must hold num_examples only")
    if len(content[FITRES_PARAMS]) != 0:
        raise PrivacyViolation("SecAgg+ reply holds unmasked parameters")
    status = content[FITRES_STATUS]
    if dict(status) != {"code": int(Code.OK.value), "message": ""}:
        raise PrivacyViolation("SecAgg+ reply status must be OK with an empty message")


def check_reply(reply: Message, allowed: Layout | None = None, stage: str | None = None) -> None:
    """Raise PrivacyViolation unless the reply holds only the allowed records: a MetricRecord and,
    if `allowed` (the received global adapter's layout) is given, an update of exactly that layout.

    Flower's MetricRecord itself admits only numbers, so checking record names and types suffices.
    An error reply must hold one of the FailureCodes with exactly its fixed message.
    """
    if reply.has_error():
        code, reason = reply.error.code, reply.error.reason
        if code not in {int(c) for c in FailureCode} or reason != FailureCode(code).message:
            raise PrivacyViolation(f"error reply with code {code} and a free-text reason; only a FailureCode "
                                   "with its fixed message may leave a device")
        return
    if stage is not None:  # a SecAgg+ protocol message: its stage's records only
        check_secagg_reply(reply, stage, allowed)
        return
    content = reply.content
    batched = {k: d for k in content.keys() if (d := batch_update_device(k)) is not None}
    extra = sorted(set(content.keys()) - ALLOWED_KEYS - set(batched))
    if extra:
        raise PrivacyViolation(f"reply holds records {extra}; only {sorted(ALLOWED_KEYS)} (and, from a batch, "
                               f"'{GLOBAL_UPDATE_KEY}.<device id>') may leave a device")
    if METRICS_KEY in content and not isinstance(content[METRICS_KEY], MetricRecord):
        raise PrivacyViolation(f"'{METRICS_KEY}' must be a MetricRecord of numbers")
    if batched:
        # the ids alone (not device_metrics): a hand-built reply's other metric lists need not line up
        ids = content[METRICS_KEY].get("device_id", []) if METRICS_KEY in content else []
        ran = {int(d) for d in (ids if isinstance(ids, list) else [ids])}
        strangers = sorted(set(batched.values()) - ran)
        if strangers:
            raise PrivacyViolation(f"the reply holds updates for devices {strangers[:3]} it reports no results for")
    for key in ([GLOBAL_UPDATE_KEY] if GLOBAL_UPDATE_KEY in content else []) + list(batched):
        record = content[key]
        if not isinstance(record, ArrayRecord):
            raise PrivacyViolation(f"'{key}' must be an ArrayRecord (the global-adapter contribution)")
        names = list(record.keys())
        check_update_layout(names, {k: tuple(record[k].shape) for k in names},
                             {k: str(np.dtype(record[k].dtype)) for k in names}, allowed)


_log = logging.getLogger("fedasls.device.device")  # the worker's (device's) local log; never sent


def privacy_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run the app; a failure becomes a fixed error reply, and a reply that would
    leak anything (an update must have exactly the names, order and shapes of the global adapter
    this message carried) is replaced by a REFUSED error reply (details go to the local log only).
    A SecAgg+ message's reply is checked against its stage (`check_secagg_reply`)."""
    try:  # read before the app runs: secaggplus_mod pops the stage
        stage, allowed = secagg_stage(msg), allowed_layout(msg)
    except Exception:  # noqa: BLE001 - a malformed downlink
        _log.exception("malformed downlink")
        return error_reply(msg, FailureCode.ERROR)
    try:
        reply = call_next(msg, context)
    except DeviceFailure as failure:  # already logged in the device's errors.log
        return error_reply(msg, failure.code)
    except Exception:  # noqa: BLE001 - raised outside `contained`: log locally, send the code only
        _log.exception("device round failed")
        return error_reply(msg, FailureCode.ERROR)
    try:
        check_reply(reply, allowed, stage)
    except PrivacyViolation:
        _log.exception("reply refused by the privacy guard")
        return error_reply(msg, FailureCode.REFUSED)
    return reply
