"""The privacy boundary: the one function that builds what leaves a device, and the mod that
refuses any reply holding anything else.

A reply may carry one MetricRecord of scalar numbers under "metrics" and, in a global-adapter
round, the device's clipped update of the shared LoRA tensors under "global-update": an
ArrayRecord with exactly the names, order and shapes of the "global-adapter" record the device
received (float32). Raw text, buffers, profiles and personal adapters never leave: there is no
code path that puts them in a reply, and the guard refuses any reply that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch is imported only where tensors leave: a QUERY process needs none of it
    import torch

METRICS_KEY = "metrics"
GLOBAL_UPDATE_KEY = "global-update"  # a device's contribution to the global adapter
GLOBAL_ADAPTER_KEY = "global-adapter"  # downlink: the global adapter's shared tensors (defines what may return)
ALLOWED_KEYS = frozenset({METRICS_KEY, GLOBAL_UPDATE_KEY})


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


def build_batch_reply(msg: Message, rows: list[Mapping[str, float | int]]) -> Message:
    """The reply of a worker slot that ran several devices: one MetricRecord whose every key holds a
    list with one number per device (in the order of the rows); numbers only, as in `build_reply`."""
    keys = sorted({key for row in rows for key in row})
    clean: dict[str, list[int] | list[float]] = {}
    for key in keys:
        values = [row[key] for row in rows]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise PrivacyViolation(f"metric '{key}' holds a non-number, only numbers may leave a device")
        clean[key] = values if all(isinstance(v, int) for v in values) else [float(v) for v in values]
    return Message(RecordDict({METRICS_KEY: MetricRecord(clean)}), reply_to=msg)


def device_metrics(reply: Message) -> list[dict[str, float | int]]:
    """Per-device metric dicts of a reply from `build_reply` (one device) or `build_batch_reply`."""
    metrics = dict(reply.content[METRICS_KEY])
    if "device_id" not in metrics:  # a batch whose every device failed
        return []
    if not isinstance(metrics["device_id"], list):
        return [metrics]
    return [{key: values[i] for key, values in metrics.items()} for i in range(len(metrics["device_id"]))]


def check_reply(reply: Message, allowed: Layout | None = None) -> None:
    """Raise PrivacyViolation unless the reply holds only the allowed records: a MetricRecord and,
    if `allowed` (the received global adapter's layout) is given, an update of exactly that layout.

    Flower's MetricRecord itself admits only numbers, so checking record names and types suffices.
    """
    if reply.has_error():
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


def privacy_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run the app, then refuse (raise) if its reply would leak anything; an update must
    have exactly the names, order and shapes of the global adapter this message carried."""
    reply = call_next(msg, context)
    check_reply(reply, allowed_layout(msg))
    return reply
