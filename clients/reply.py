"""The privacy boundary: the one function that builds what leaves a device, and the mod that
refuses any reply holding anything else.

A reply may carry one MetricRecord of scalar numbers under "metrics" and, in a later issue,
an optional global-adapter contribution under "global-update". Raw text, buffers, profiles and
personal adapters never leave: there is no code path that puts them in a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

METRICS_KEY = "metrics"
GLOBAL_UPDATE_KEY = "global-update"  # reserved for the optional, aggregated global adapter
ALLOWED_KEYS = frozenset({METRICS_KEY, GLOBAL_UPDATE_KEY})


class PrivacyViolation(RuntimeError):
    """A reply tried to carry something other than scalar metrics (or a global update)."""


def build_reply(msg: Message, metrics: Mapping[str, float | int]) -> Message:
    """The reply to `msg`: scalar metrics only (NaN is sent as-is; strings are refused)."""
    clean: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrivacyViolation(f"metric '{key}' is {type(value).__name__}, only numbers may leave a device")
        clean[key] = value if isinstance(value, int) else float(value)
    return Message(RecordDict({METRICS_KEY: MetricRecord(clean)}), reply_to=msg)


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


def check_reply(reply: Message) -> None:
    """Raise PrivacyViolation unless the reply holds only the allowed records.

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
    if GLOBAL_UPDATE_KEY in content and not isinstance(content[GLOBAL_UPDATE_KEY], ArrayRecord):
        raise PrivacyViolation(f"'{GLOBAL_UPDATE_KEY}' must be an ArrayRecord (the global-adapter contribution)")


def privacy_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run the app, then refuse (raise) if its reply would leak anything."""
    reply = call_next(msg, context)
    check_reply(reply)
    return reply
