"""The privacy boundary: the one function that builds what leaves a device, and the mod that
refuses any reply holding anything else.

A reply may carry one MetricRecord of scalar numbers under "metrics" and, in a global-adapter
round, the device's clipped update of the shared LoRA tensors under "global-update": an
ArrayRecord with exactly the names, order and shapes of the "global-adapter" record the device
received (float32). Raw text, buffers, profiles and personal adapters never leave: there is no
code path that puts them in a reply, and the guard refuses any reply that does not fit.

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
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from fedasls.faults import DeviceFailure, FailureCode

if TYPE_CHECKING:  # torch is imported only where tensors leave: a QUERY process needs none of it
    import torch

METRICS_KEY = "metrics"
GLOBAL_UPDATE_KEY = "global-update"  # a device's contribution to the global adapter
GLOBAL_ADAPTER_KEY = "global-adapter"  # downlink: the global adapter's shared tensors (defines what may return)
ALLOWED_KEYS = frozenset({METRICS_KEY, GLOBAL_UPDATE_KEY})
FAILED_IDS_KEY, FAILED_CODES_KEY = "failed_device_id", "failure_code"  # a batch reply's failed devices


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
        import torch

        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in update.items()}
        _check_update_layout(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()},
                             {k: str(v.dtype) for k, v in tensors.items()}, allowed_layout(msg))
        records[GLOBAL_UPDATE_KEY] = ArrayRecord(tensors)
    return Message(RecordDict(records), reply_to=msg)


def allowed_layout(msg: Message) -> Layout | None:
    """Names and shapes a reply's update may have: those of the received global adapter (None: no update allowed)."""
    if msg.has_error() or GLOBAL_ADAPTER_KEY not in msg.content:
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


def error_reply(msg: Message, code: FailureCode) -> Message:
    """The reply of a failed device round: the code and its fixed message, nothing else."""
    return Message(Error(code=int(code), reason=code.message), reply_to=msg)


def build_batch_reply(msg: Message, rows: list[Mapping[str, float | int]],
                      failures: Mapping[int, FailureCode] | None = None) -> Message:
    """The reply of a worker slot that ran several devices: one MetricRecord whose every key holds a
    list with one number per device (in the order of the rows); numbers only, as in `build_reply`.
    A metric that some devices do not report (e.g. a stage one of them never ran) is NaN for the
    others. Devices that failed are listed apart, by id and FailureCode only (`device_failures`)."""
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
    return Message(RecordDict({METRICS_KEY: MetricRecord(clean)}), reply_to=msg)


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


def check_reply(reply: Message, allowed: Layout | None = None) -> None:
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
    content = reply.content
    extra = sorted(set(content.keys()) - ALLOWED_KEYS)
    if extra:
        raise PrivacyViolation(f"reply holds records {extra}; only {sorted(ALLOWED_KEYS)} may leave a device")
    if METRICS_KEY in content and not isinstance(content[METRICS_KEY], MetricRecord):
        raise PrivacyViolation(f"'{METRICS_KEY}' must be a MetricRecord of numbers")
    if GLOBAL_UPDATE_KEY in content:
        record = content[GLOBAL_UPDATE_KEY]
        if not isinstance(record, ArrayRecord):
            raise PrivacyViolation(f"'{GLOBAL_UPDATE_KEY}' must be an ArrayRecord (the global-adapter contribution)")
        names = list(record.keys())
        _check_update_layout(names, {k: tuple(record[k].shape) for k in names},
                             {k: str(np.dtype(record[k].dtype)) for k in names}, allowed)


_log = logging.getLogger("fedasls.device")  # the worker's (device's) local log; never sent


def privacy_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run the app; a failure becomes a fixed error reply, and a reply that would
    leak anything (an update must have exactly the names, order and shapes of the global adapter
    this message carried) is replaced by a REFUSED error reply (details go to the local log only)."""
    try:
        reply = call_next(msg, context)
    except DeviceFailure as failure:  # already logged in the device's errors.log
        return error_reply(msg, failure.code)
    except Exception:  # noqa: BLE001 - raised outside `contained`: log locally, send the code only
        _log.exception("device round failed")
        return error_reply(msg, FailureCode.ERROR)
    try:
        check_reply(reply, allowed_layout(msg))
    except PrivacyViolation:
        _log.exception("reply refused by the privacy guard")
        return error_reply(msg, FailureCode.REFUSED)
    return reply
