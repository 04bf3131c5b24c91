"""The privacy boundary on the device: the ClientApp mod that refuses any reply holding anything
but what `wire.messages.build_reply` / `build_fit_reply` / `build_batch_reply` may build.

A reply may carry one MetricRecord of numbers whose names are on the allow-list
(`wire.messages.METRIC_RULES`), each within its range (NaN only where the list allows it, and then
without payload bits) and, in a global-adapter round, the device's update with exactly the names,
order, shapes and dtype (float32) of the global adapter it received, finite values and an L2 norm of
at most the round's clip_norm (the Downlink the device received); under SecAgg+ each protocol
stage's records only; an error reply only a FailureCode with its fixed message. Anything else is
replaced by the REFUSED code (the server counts it as a "refused" failure); the log names the
record, metric or tensor and the rule, never a refused value. The guard catches whatever the app
raises, so Flower never sees an exception from a device. Adaptive clipping's bit ("unclipped",
0 or 1) may leave only in a round whose Downlink asks for it (`check_unclipped_asked`).

What the rules leave open, by design: an allowed metric may still vary within its range, so a
number can carry a few dozen bits; ranges bound that channel, they do not close it (DP on the
update is what bounds what the server learns from an update).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import Code, bytes_to_ndarray
from flwr.compat.common import recorddict_compat as compat
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedasls.device.faults import DeviceFailure, FailureCode
from wire.messages import (
    ALLOWED_KEYS,
    FAILED_IDS_KEY,
    FITRES_EXAMPLES,
    FITRES_METRICS,
    FITRES_PARAMS,
    FITRES_STATUS,
    FIT_CONFIG,
    GLOBAL_UPDATE_KEY,
    METRICS_KEY,
    SECAGG_CONFIGS,
    Layout,
    PrivacyViolation,
    allowed_layout,
    batch_update_device,
    check_metric,
    check_metrics,
    check_update_layout,
    check_update_values,
    downlink_knobs,
    error_reply,
    secagg_stage,
    unit_weight,
)


# What each SecAgg+ stage's reply may hold in its protocol record: key -> (is a list, element type).
_SECAGG_REPLY_KEYS: dict[str, dict[str, tuple[bool, type]]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: (False, bytes), Key.PUBLIC_KEY_2: (False, bytes)},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: (True, int), Key.CIPHERTEXT_LIST: (True, bytes)},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: (True, bytes)},
    Stage.UNMASK: {Key.NODE_ID_LIST: (True, int), Key.SHARE_LIST: (True, bytes)},
}
_FITRES_RECORDS = frozenset({FITRES_METRICS, FITRES_EXAMPLES, FITRES_PARAMS, FITRES_STATUS})


MASK_MODULUS = 2**32  # the largest modulus Flower's SecAgg+ allows: every masked value lies below it


def secagg_request(msg: Message, stage: str | None) -> dict[str, list[int]]:
    """What a SecAgg+ stage's reply is checked against, read from its message before `secaggplus_mod`
    runs: the neighbours whose public keys stage 1 received (its shares may go only to them), and the
    active and dead node ids stage 3 asks shares for (its reply must name exactly those)."""
    if stage is None or msg.has_error():
        return {}
    configs = msg.content[SECAGG_CONFIGS]
    if stage == Stage.SHARE_KEYS:
        return {"neighbours": sorted(int(k) for k in configs.keys() if k != Key.STAGE)}
    if stage == Stage.UNMASK:
        return {"active": [int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]],
                "dead": [int(n) for n in configs[Key.DEAD_NODE_ID_LIST]]}
    return {}


def _check_public_key(key: bytes) -> None:
    """A stage-0 public key: exactly the PEM an EC public key serializes to (nothing appended)."""
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    try:
        ok = public_key_to_bytes(bytes_to_public_key(key)) == key
    except Exception:  # noqa: BLE001 - not a key
        ok = False
    if not ok:
        raise PrivacyViolation("SecAgg+ setup reply: a public key is not a serialized EC public key")


def _one_length(values: list[bytes], what: str) -> None:
    if len({len(v) for v in values}) > 1:
        raise PrivacyViolation(f"SecAgg+ {what} differ in length (each is the same protocol object)")


def _check_stage_payload(stage: str, configs: ConfigRecord, request: dict[str, list[int]]) -> None:
    """Per stage, what Flower's secaggplus_mod sends and nothing else: two distinct public keys (0);
    one encrypted share per neighbour named in the message, except itself, each once, all of one length
    (1); in stage 3 one share per node id the server asked for, in its order (active, then dead), each
    kind of one length."""
    if stage == Stage.SETUP:
        keys = [configs[Key.PUBLIC_KEY_1], configs[Key.PUBLIC_KEY_2]]
        for key in keys:
            _check_public_key(key)
        if keys[0] == keys[1]:
            raise PrivacyViolation("SecAgg+ setup reply: the two public keys are identical")
    elif stage == Stage.SHARE_KEYS:
        dsts, ciphertexts = list(configs[Key.DESTINATION_LIST]), list(configs[Key.CIPHERTEXT_LIST])
        neighbours = set(request.get("neighbours", []))
        if (len(dsts) != len(ciphertexts) or len(set(dsts)) != len(dsts) or not set(dsts) <= neighbours
                or len(dsts) != max(len(neighbours) - 1, 0)):
            raise PrivacyViolation("SecAgg+ share-keys reply: its destinations are not the message's neighbours "
                                   "(each once, one ciphertext each)")
        _one_length(ciphertexts, "share-keys ciphertexts")
    elif stage == Stage.UNMASK:
        nodes, shares = list(configs[Key.NODE_ID_LIST]), list(configs[Key.SHARE_LIST])
        active, dead = request.get("active", []), request.get("dead", [])
        if nodes != active + dead or len(shares) != len(nodes):
            raise PrivacyViolation("SecAgg+ unmask reply: its node ids are not the ones the message asked for "
                                   "(one share each)")
        _one_length(shares[:len(active)], "unmask shares")
        _one_length(shares[len(active):], "unmask shares")


def check_secagg_reply(reply: Message, stage: str, allowed: Layout | None, unit: int = 0,
                       request: dict[str, list[int]] | None = None) -> None:
    """Raise PrivacyViolation unless a SecAgg+ reply holds only what its stage sends: the protocol
    record with that stage's keys (public keys, encrypted shares, key shares: bytes made by Flower's
    mod), and in the masked-vector stage also the masked vector (integer arrays: the weight factor,
    then exactly the global adapter's shapes), metrics by the allow-list, the weight (an integer, at
    most the device's `examples`; under DP 0 or the round's `unit` weight), an OK status and an emptied
    parameters record. (Error replies are checked by `check_reply`.)"""
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
        _check_stage_payload(stage, configs, request or {})
        return
    if allowed is None:
        raise PrivacyViolation("a masked vector may only answer a SecAgg+ round that sent the global adapter")
    masked = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    shapes = [tuple(a.shape) for a in masked]
    if shapes != [(1,), *allowed.values()] or any(a.dtype != np.int64 for a in masked):
        raise PrivacyViolation(f"the masked vector's arrays {shapes[:3]}... are not the weight factor and the global "
                               "adapter's shapes (int64, as secaggplus_mod sends them)")
    if any(a.size and (int(a.min()) < 0 or int(a.max()) >= MASK_MODULUS) for a in masked):
        raise PrivacyViolation("the masked vector holds values outside [0, 2**32) (masked values are reduced "
                               "modulo the mask modulus)")
    # The masked vector is uniformly random to anyone without the other devices' masks: its norm and
    # values cannot be checked here (`check_fitres` checked the update before secaggplus_mod masked
    # it). What leaves in the clear beside it can: the metrics and the weight, by the same rules.
    _check_fitres_scalars(content, unit)
    if len(content[FITRES_PARAMS]) != 0:
        raise PrivacyViolation("SecAgg+ reply holds unmasked parameters")


def _check_fitres_scalars(content, unit: int = 0) -> None:
    """A FitRes's metrics (the allow-list, scalars), weight (an integer count, at most the device's
    `examples`: `build_fit_reply` caps it; with a `unit` weight (DP), 0 or exactly it) and status (OK,
    no text)."""
    metrics = content[FITRES_METRICS]
    if not isinstance(metrics, ConfigRecord) or any(isinstance(v, list) for v in metrics.values()):
        raise PrivacyViolation("SecAgg+ metrics must be scalar numbers")
    check_metrics(metrics)
    examples = content[FITRES_EXAMPLES]
    if not isinstance(examples, MetricRecord) or set(examples.keys()) != {"num_examples"}:
        raise PrivacyViolation("SecAgg+ weight record must hold num_examples only")
    weight = examples["num_examples"]
    check_metric("examples", weight)
    if unit and weight not in (0, unit):
        raise PrivacyViolation("SecAgg+ weight must be 0 or the round's unit weight (DP: every update alike)")
    if not unit and weight > metrics.get("examples", 0):
        raise PrivacyViolation("SecAgg+ weight must not exceed the device's 'examples' metric")
    status = content[FITRES_STATUS]
    if dict(status) != {"code": int(Code.OK.value), "message": ""}:
        raise PrivacyViolation("SecAgg+ reply status must be OK with an empty message")


def check_fitres(reply: Message, allowed: Layout | None, clip_norm: float | None, unit: int = 0) -> None:
    """Raise PrivacyViolation unless a SecAgg+ handler's FitRes (before `secaggplus_mod` masks it)
    holds the FitRes records only: metrics and weight as `check_secagg_reply` checks them, an OK
    status, and the update as the global adapter's float32 arrays in its order, finite and within
    the round's clip_norm (a device with no update sends zeros with weight 0)."""
    content = reply.content
    if set(content.keys()) != _FITRES_RECORDS:
        raise PrivacyViolation(f"SecAgg+ FitRes holds records {sorted(content.keys())}, expected "
                               f"{sorted(_FITRES_RECORDS)}")
    _check_fitres_scalars(content, unit)
    if allowed is None:
        raise PrivacyViolation("a SecAgg+ FitRes may only answer a round that sent the global adapter")
    if not isinstance(content[FITRES_PARAMS], ArrayRecord):
        raise PrivacyViolation(f"'{FITRES_PARAMS}' must be an ArrayRecord")
    arrays = compat.recorddict_to_fitres(content, keep_input=True).parameters.tensors
    if len(arrays) != len(allowed):
        raise PrivacyViolation("the SecAgg+ FitRes does not hold one array per global-adapter tensor")
    decoded = dict(zip(allowed, (bytes_to_ndarray(b) for b in arrays)))
    check_update_layout(list(decoded), {k: tuple(a.shape) for k, a in decoded.items()},
                        {k: str(a.dtype) for k, a in decoded.items()}, allowed)
    check_update_values(decoded, clip_norm)


def unmasked_guard(call_next: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Wrap the handler `secaggplus_mod` calls in the masked-vector stage: its FitRes is checked by
    `check_fitres` (layout, finite, clip_norm) before the mod masks it, past any later check."""
    def checked(msg: Message, context: Context) -> Message:
        allowed, clip_norm, unit = allowed_layout(msg), round_clip_norm(msg), unit_weight(msg)
        reply = call_next(msg, context)
        if not reply.has_error():
            check_fitres(reply, allowed, clip_norm, unit)
        return reply

    return checked


def round_clip_norm(msg: Message) -> float | None:
    """The clip norm of the round's Downlink the message carries (None: no global-adapter round)."""
    knobs = downlink_knobs(msg)
    return None if knobs is None else float(knobs["clip_norm"])


UNCLIPPED = "unclipped"  # adaptive clipping's bit (fedasls.privacy.adaptive_clipping): METRIC_RULES bounds it to {0, 1}


def round_asks_unclipped(msg: Message) -> bool:
    """Whether the round's Downlink asks devices for adaptive clipping's unclipped bit."""
    knobs = downlink_knobs(msg)
    return knobs is not None and bool(knobs["report_unclipped"])


def check_unclipped_asked(reply: Message, asked: bool) -> None:
    """Raise PrivacyViolation if the reply carries the unclipped bit in a round that did not ask for it
    (the bit is accounted only where the server noises its count: adaptive clipping under DP)."""
    if asked or reply.has_error():
        return
    for key in (METRICS_KEY, FITRES_METRICS):
        if key in reply.content and UNCLIPPED in reply.content[key]:
            raise PrivacyViolation(f"metric '{UNCLIPPED}' in a round without adaptive clipping (its count is noised "
                                   "and accounted only when the round asks for it)")


def expected_devices(msg: Message, context: Context) -> set[int] | None:
    """The device ids a reply to `msg` may report: those the message names ("device-id", or a worker
    slot's "device-ids"), else this SuperNode's partition-id; None when neither is known."""
    if msg.has_error():
        return None
    config = msg.content[FIT_CONFIG] if FIT_CONFIG in msg.content else msg.content.get("config")
    if isinstance(config, ConfigRecord) and "device-ids" in config:
        return {int(d) for d in config["device-ids"]}
    if isinstance(config, ConfigRecord) and "device-id" in config:
        return {int(config["device-id"])}
    if "partition-id" in context.node_config:
        return {int(context.node_config["partition-id"])}
    return None


def check_device_ids(metrics, devices: set[int] | None) -> None:
    """Raise PrivacyViolation unless the reply reports each device once, and only devices its message
    asked for (`expected_devices`): a device id cannot carry anything else."""
    if devices is None:
        return
    ids = []
    for key in ("device_id", FAILED_IDS_KEY):
        value = metrics.get(key, [])
        ids += value if isinstance(value, list) else [value]
    if len(set(ids)) != len(ids) or not set(ids) <= devices:
        raise PrivacyViolation("the reply reports devices its message did not ask for (or one twice)")


def check_reply(reply: Message, allowed: Layout | None = None, stage: str | None = None,
                clip_norm: float | None = None, devices: set[int] | None = None, unit: int = 0,
                request: dict[str, list[int]] | None = None) -> None:
    """Raise PrivacyViolation unless the reply holds only the allowed records: a MetricRecord of the
    allow-list's names and ranges (one device's scalars, or a batch's lists) and, if `allowed` (the
    received global adapter's layout) is given, updates of exactly that layout, finite, of L2 norm at
    most `clip_norm` (the round's, from the Downlink the device received). With `devices`, the
    reply may report only those device ids (`expected_devices`).

    An error reply must hold one of the FailureCodes with exactly its fixed message.
    """
    if reply.has_error():
        code, reason = reply.error.code, reply.error.reason
        if code not in {int(c) for c in FailureCode} or reason != FailureCode(code).message:
            raise PrivacyViolation(f"error reply with code {code} and a free-text reason; only a FailureCode "
                                   "with its fixed message may leave a device")
        return
    if stage is not None:  # a SecAgg+ protocol message: its stage's records only
        check_secagg_reply(reply, stage, allowed, unit, request)
        if FITRES_METRICS in reply.content:
            check_device_ids(reply.content[FITRES_METRICS], devices)
        return
    content = reply.content
    batched = {k: d for k in content.keys() if (d := batch_update_device(k)) is not None}
    extra = sorted(set(content.keys()) - ALLOWED_KEYS - set(batched))
    if extra:
        raise PrivacyViolation(f"reply holds records {extra}; only {sorted(ALLOWED_KEYS)} (and, from a batch, "
                               f"'{GLOBAL_UPDATE_KEY}.<device id>') may leave a device")
    if METRICS_KEY in content:
        if not isinstance(content[METRICS_KEY], MetricRecord):
            raise PrivacyViolation(f"'{METRICS_KEY}' must be a MetricRecord of numbers")
        check_metrics(content[METRICS_KEY])  # the allow-list; a batch: one number per device per name
        check_device_ids(content[METRICS_KEY], devices)
    if batched:
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
        check_update_values({k: record[k].numpy() for k in names}, clip_norm)


_log = logging.getLogger("fedasls.device.device")  # the worker's (device's) local log; never sent


def privacy_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run the app; a failure becomes a fixed error reply, and a reply that would
    leak anything (an update must have exactly the names, order and shapes of the global adapter
    this message carried, finite values and an L2 norm within its clip_norm; metrics by the
    allow-list, for the devices the message asked for) is replaced by a REFUSED error reply (details go to the local log only). A reply
    the app's own builders refused (PrivacyViolation) is REFUSED too. A SecAgg+ message's reply
    is checked against its stage (`check_secagg_reply`)."""
    try:  # read before the app runs: secaggplus_mod pops the stage
        stage, allowed, clip_norm = secagg_stage(msg), allowed_layout(msg), round_clip_norm(msg)
        unit, request = unit_weight(msg), secagg_request(msg, stage)
        devices = expected_devices(msg, context)
        asks_unclipped = round_asks_unclipped(msg)
    except Exception:  # noqa: BLE001 - a malformed downlink
        _log.exception("malformed downlink")
        return error_reply(msg, FailureCode.ERROR)
    try:
        reply = call_next(msg, context)
    except DeviceFailure as failure:  # already logged in the device's errors.log
        return error_reply(msg, failure.code)
    except PrivacyViolation:  # build_reply & co. (or `unmasked_guard`) refused what the app built
        _log.exception("reply refused before it was built")
        return error_reply(msg, FailureCode.REFUSED)
    except Exception:  # noqa: BLE001 - raised outside `contained`: log locally, send the code only
        _log.exception("device round failed")
        return error_reply(msg, FailureCode.ERROR)
    try:
        check_reply(reply, allowed, stage, clip_norm, devices, unit, request)
        check_unclipped_asked(reply, asks_unclipped)
    except PrivacyViolation:
        _log.exception("reply refused by the privacy guard")
        return error_reply(msg, FailureCode.REFUSED)
    return reply
