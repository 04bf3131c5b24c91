"""The privacy boundary: the one function that builds what leaves a device, and the mod that
refuses any reply holding anything else.

A reply may carry one MetricRecord of scalar numbers under "metrics" and, in a global-adapter
round, the device's clipped update of the shared LoRA tensors under "global-update": an
ArrayRecord with exactly the names, order and shapes of the "global-adapter" record the device
received (float32). A worker slot that ran several devices sends one such record per device that
trained, under "global-update.<device id>". Raw text, buffers, profiles and personal adapters
never leave: there is no code path that puts them in a reply, and the guard refuses any reply
that does not fit.

Under SecAgg+ ([federated] secure_aggregation = "secagg+", server/secagg.py) a round is Flower's
four-stage protocol and the update never leaves in the clear: `build_fit_reply` builds the
handler's reply (FitRes layout: the same checked metrics and update, via `build_reply`), Flower's
`secaggplus_mod` masks it, and the guard checks what the mod sends in each stage: public keys,
encrypted shares, the masked vector (integer arrays of exactly the global adapter's shapes, plus
the weight factor) with the scalar metrics and the weight, and key shares; nothing else.

Error replies pass the guard too: a failing device sends a `FailureCode` and its fixed message,
never an exception's text (which Flower would otherwise send as the error's reason). The guard
catches whatever the app raises, so Flower never sees an exception from a device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedasls.faults import DeviceFailure, FailureCode

if TYPE_CHECKING:  # torch is imported only where tensors leave: a QUERY process needs none of it
    import torch

METRICS_KEY = "metrics"
GLOBAL_UPDATE_KEY = "global-update"  # a device's contribution to the global adapter
GLOBAL_ADAPTER_KEY = "global-adapter"  # downlink: the global adapter's shared tensors (defines what may return)
ALLOWED_KEYS = frozenset({METRICS_KEY, GLOBAL_UPDATE_KEY})
FAILED_IDS_KEY, FAILED_CODES_KEY = "failed_device_id", "failure_code"  # a batch reply's failed devices

# SecAgg+ rounds speak Flower's legacy FitIns/FitRes layout (flwr.compat recorddict_compat).
SECAGG_CONFIGS = RECORD_KEY_CONFIGS  # the protocol's record, in every SecAgg+ message and reply
FIT_CONFIG, FIT_PARAMS = "fitins.config", "fitins.parameters"  # downlink: round config, global adapter
ADAPTER_NAMES = "adapter-names"  # fitins.config: the global adapter's tensor names, in order (legacy arrays are nameless)
FITRES_METRICS, FITRES_EXAMPLES = "fitres.metrics", "fitres.num_examples"
FITRES_PARAMS, FITRES_STATUS = "fitres.parameters", "fitres.status"
LEGACY_TENSOR_TYPE = "numpy.ndarray"


class PrivacyViolation(RuntimeError):
    """A reply tried to carry something other than scalar metrics (or a global update)."""


Layout = dict[str, tuple[int, ...]]


def build_reply(msg: Message, metrics: Mapping[str, float | int],
                update: Mapping[str, torch.Tensor] | None = None) -> Message:
    """The reply to `msg`: scalar metrics (NaN is sent as-is; strings are refused) and, when given,
    the global-adapter update (it must fit the layout of the global adapter `msg` carried)."""
    clean: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrivacyViolation(f"metric '{key}' is {type(value).__name__}, only numbers may leave a device")
        clean[key] = value if isinstance(value, int) else float(value)
    records: dict = {METRICS_KEY: MetricRecord(clean)}
    if update is not None:
        records[GLOBAL_UPDATE_KEY] = _update_record(msg, update)
    return Message(RecordDict(records), reply_to=msg)


def _update_record(msg: Message, update: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A device's update as float32 on the CPU, refused unless it fits the global adapter `msg` carried."""
    import torch

    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in update.items()}
    _check_update_layout(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()},
                         {k: str(v.dtype) for k, v in tensors.items()}, allowed_layout(msg))
    return ArrayRecord(tensors)


def batch_update_key(device_id: int) -> str:
    """The record under which a worker slot's batch reply carries one device's update."""
    return f"{GLOBAL_UPDATE_KEY}.{int(device_id)}"


def _batch_update_device(key: str) -> int | None:
    """The device id of a batch reply's update record key, else None."""
    head, _, tail = key.partition(".")
    return int(tail) if head == GLOBAL_UPDATE_KEY and tail.isdigit() else None


def torch_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord's arrays as torch tensors, in its order (flwr's `to_torch_state_dict` works only
    once torch is imported, which a fresh ClientApp process may not have done yet)."""
    import torch  # noqa: F401

    return record.to_torch_state_dict()


def reply_updates(reply: Message) -> dict[int, dict[str, torch.Tensor]]:
    """The global-adapter updates a reply carries, by device id (one device's reply or a batch's)."""
    if reply.has_error():
        return {}
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key in reply.content.keys():
        if key == GLOBAL_UPDATE_KEY:
            out[int(reply.content[METRICS_KEY]["device_id"])] = torch_tensors(reply.content[key])
        elif (device_id := _batch_update_device(key)) is not None:
            out[device_id] = torch_tensors(reply.content[key])
    return out


def fit_adapter(msg: Message) -> dict[str, np.ndarray]:
    """The global adapter a SecAgg+ round's FitIns carries, by name (the names travel in its config)."""
    names = [str(n) for n in msg.content[FIT_CONFIG][ADAPTER_NAMES]]
    arrays = [bytes_to_ndarray(a.data) for a in msg.content[FIT_PARAMS].values()]
    if len(names) != len(arrays):
        raise ValueError(f"the FitIns holds {len(arrays)} arrays for {len(names)} adapter names")
    return dict(zip(names, arrays))


def allowed_layout(msg: Message) -> Layout | None:
    """Names and shapes a reply's update may have: those of the received global adapter (None: no update allowed)."""
    if msg.has_error():
        return None
    if FIT_CONFIG in msg.content and FIT_PARAMS in msg.content:  # a SecAgg+ round (legacy FitIns)
        return {k: tuple(int(d) for d in a.shape) for k, a in fit_adapter(msg).items()}
    if GLOBAL_ADAPTER_KEY not in msg.content:
        return None
    record = msg.content[GLOBAL_ADAPTER_KEY]
    if not isinstance(record, ArrayRecord):
        return None
    return {k: tuple(int(d) for d in a.shape) for k, a in record.items()}


def _check_update_layout(names: list[str], shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str],
                         allowed: Layout | None) -> None:
    if allowed is None:
        raise PrivacyViolation("the reply holds a global-adapter update, but this round sent no global adapter")
    if names != list(allowed):
        extra = sorted(set(names) - set(allowed))[:3]
        missing = sorted(set(allowed) - set(names))[:3]
        raise PrivacyViolation(
            f"the update's tensors are not the global adapter's, in its order (extra {extra}, missing {missing})"
        )
    for name in names:
        if tuple(shapes[name]) != allowed[name]:
            raise PrivacyViolation(f"update tensor '{name}' has shape {tuple(shapes[name])}, expected {allowed[name]}")
        if dtypes[name] not in ("torch.float32", "float32"):
            raise PrivacyViolation(f"update tensor '{name}' is {dtypes[name]}; only float32 updates may leave")


def build_fit_reply(msg: Message, metrics: Mapping[str, float | int], update: Mapping[str, torch.Tensor] | None,
                    max_weight: float) -> Message:
    """The reply to a SecAgg+ round's FitIns, in Flower's FitRes layout, for `secaggplus_mod` to mask:
    the metrics and update are checked by `build_reply` (the same rules), the update's arrays go in
    the global adapter's order, and the weight is the example count capped at `max_weight` (SecAgg+
    scales by weight / max_weight and clips to the range, so a larger weight would be clipped). A
    device with no update sends zeros with weight 0 (every participant must send a vector)."""
    checked = build_reply(msg, metrics, update)  # raises PrivacyViolation unless numbers + the global layout
    layout = allowed_layout(msg)
    if layout is None:
        raise PrivacyViolation("a SecAgg+ reply needs the global adapter of its FitIns")
    clean = dict(checked.content[METRICS_KEY])
    if update is None:
        arrays, weight = [np.zeros(shape, dtype=np.float32) for shape in layout.values()], 0
    else:
        record = checked.content[GLOBAL_UPDATE_KEY]
        arrays = [record[name].numpy() for name in layout]
        weight = int(min(float(clean.get("examples", 0)), max_weight))
    fitres = FitRes(Status(Code.OK, ""), Parameters([ndarray_to_bytes(a) for a in arrays], LEGACY_TENSOR_TYPE),
                    weight, clean)
    return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a message asks for (None: not a SecAgg+ message). Read it before the mod runs:
    `secaggplus_mod` pops it from the message."""
    if msg.has_error() or SECAGG_CONFIGS not in msg.content:
        return None
    stage = msg.content[SECAGG_CONFIGS].get(Key.STAGE)
    return str(stage) if stage is not None else None


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


def error_reply(msg: Message, code: FailureCode) -> Message:
    """The reply of a failed device round: the code and its fixed message, nothing else."""
    return Message(Error(code=int(code), reason=code.message), reply_to=msg)


def build_batch_reply(msg: Message, rows: list[Mapping[str, float | int]],
                      failures: Mapping[int, FailureCode] | None = None,
                      updates: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> Message:
    """The reply of a worker slot that ran several devices: one MetricRecord whose every key holds a
    list with one number per device (in the order of the rows); numbers only, as in `build_reply`.
    A metric that some devices do not report (e.g. a stage one of them never ran) is NaN for the
    others. Devices that failed are listed apart, by id and FailureCode only (`device_failures`).
    In a global-adapter round each device's update goes in its own record (`batch_update_key`),
    checked against the global adapter `msg` carried, for devices of the rows only."""
    keys = sorted({key for row in rows for key in row})
    clean: dict[str, list[int] | list[float]] = {}
    for key in keys:
        values = [row.get(key, math.nan) for row in rows]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise PrivacyViolation(f"metric '{key}' holds a non-number, only numbers may leave a device")
        clean[key] = values if all(isinstance(v, int) for v in values) else [float(v) for v in values]
    if failures:
        clean[FAILED_IDS_KEY] = [int(d) for d in failures]
        clean[FAILED_CODES_KEY] = [int(c) for c in failures.values()]
    records: dict = {METRICS_KEY: MetricRecord(clean)}
    ran = {int(row["device_id"]) for row in rows}
    for device_id, update in (updates or {}).items():
        if int(device_id) not in ran:
            raise PrivacyViolation(f"an update for device {device_id}, which is not among this batch's results")
        records[batch_update_key(device_id)] = _update_record(msg, update)
    return Message(RecordDict(records), reply_to=msg)


def device_failures(reply: Message) -> dict[int, int]:
    """Failure code per device id of a batch reply's failed devices (empty for other replies)."""
    metrics = reply.content[METRICS_KEY]
    if FAILED_IDS_KEY not in metrics:
        return {}
    return {int(d): int(c) for d, c in zip(metrics[FAILED_IDS_KEY], metrics[FAILED_CODES_KEY])}


def device_metrics(reply: Message) -> list[dict[str, float | int]]:
    """Per-device metric dicts of a reply from `build_reply` (one device) or `build_batch_reply`."""
    metrics = {k: v for k, v in reply.content[METRICS_KEY].items() if k not in (FAILED_IDS_KEY, FAILED_CODES_KEY)}
    if "device_id" not in metrics:  # a batch whose every device failed
        return []
    if not isinstance(metrics["device_id"], list):
        return [metrics]
    return [{key: values[i] for key, values in metrics.items()} for i in range(len(metrics["device_id"]))]


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
    batched = {k: d for k in content.keys() if (d := _batch_update_device(k)) is not None}
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
        _check_update_layout(names, {k: tuple(record[k].shape) for k in names},
                             {k: str(np.dtype(record[k].dtype)) for k in names}, allowed)


_log = logging.getLogger("fedasls.device")  # the worker's (device's) local log; never sent


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
