"""The messages between the server and a device: record keys, and the one place that builds
what leaves a device (`build_reply`, `build_fit_reply`, `build_batch_reply`, `error_reply`) and
decodes it on the server (`reply_updates`, `device_metrics`, `device_failures`), and the round's
Downlink (fedasls.federated.strategy) as records: `downlink_records` on the server, `read_downlink`
on the device ("global-adapter": the shared tensors; "downlink": every knob of the round).

A reply may carry one MetricRecord of scalar numbers under "metrics" (only the names of the
allow-list METRIC_RULES, each within its range) and, in a global-adapter round, the device's
clipped update of the shared LoRA tensors under "global-update": an
ArrayRecord with exactly the names, order and shapes of the "global-adapter" record the device
received (float32, finite, and of L2 norm at most the round's clip_norm: the guard checks it,
`check_update_values`). A worker slot that ran several devices sends one such record per device that
trained, under "global-update.<device id>". Raw text, buffers, profiles and personal adapters
never leave: there is no code path that puts them in a reply, and the ClientApp's guard
(clients/guard.py) refuses any reply that does not fit.

Two-phase upload ([simulation] upload, server/rounds.py): a train config with `KEEP_UPDATE` (phase 1)
asks the device to keep its update and reply metrics only; one with `FETCH_UPDATE` (phase 2)
asks for the kept update, which leaves through `build_reply` / `build_batch_reply` like any update
(metrics: the device id only), the message carrying the global adapter again for the guard's checks.

Under SecAgg+ ([federated] secure_aggregation = "secagg+", server/secagg.py) a round is Flower's
four-stage protocol and the update never leaves in the clear: `build_fit_reply` builds the
handler's reply (FitRes layout: the same checked metrics and update, via `build_reply`), and
Flower's `secaggplus_mod` masks it.

Both sides import this module; it imports Flower and fedasls only (never clients/ or server/).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedasls.device.faults import FailureCode
from fedasls.device.timing import STAGES

if TYPE_CHECKING:  # torch is imported only where tensors leave: a QUERY process needs none of it
    import torch

    from fedasls.federated.strategy import Downlink

METRICS_KEY = "metrics"
GLOBAL_UPDATE_KEY = "global-update"  # a device's contribution to the global adapter
GLOBAL_ADAPTER_KEY = "global-adapter"  # downlink: the global adapter's shared tensors (defines what may return)
DOWNLINK_KEY = "downlink"  # downlink: the round's knobs (fedasls.federated.strategy.Downlink), a ConfigRecord
KEEP_UPDATE = "keep-update"  # train config, phase 1 of a two-phase round: keep the update for this round token
FETCH_UPDATE = "fetch-update"  # train config, phase 2: reply with the update kept for this round token
ADAPTER_LAYOUT_KEY = "adapter-layout"  # phase 2: the global adapter's names and shapes only (what may return)
ALLOWED_KEYS = frozenset({METRICS_KEY, GLOBAL_UPDATE_KEY})
FAILED_IDS_KEY, FAILED_CODES_KEY = "failed_device_id", "failure_code"  # a batch reply's failed devices

# SecAgg+ rounds speak Flower's legacy FitIns/FitRes layout (flwr.compat recorddict_compat).
SECAGG_CONFIGS = RECORD_KEY_CONFIGS  # the protocol's record, in every SecAgg+ message and reply
FIT_CONFIG, FIT_PARAMS = "fitins.config", "fitins.parameters"  # downlink: round config, global adapter
ADAPTER_NAMES = "adapter-names"  # fitins.config: the global adapter's tensor names, in order (legacy arrays are nameless)
UNIT_WEIGHT = "secagg-unit-weight"  # fitins.config, DP on SecAgg+: every update's weight (> 0; absent: examples)
FITRES_METRICS, FITRES_EXAMPLES = "fitres.metrics", "fitres.num_examples"
FITRES_PARAMS, FITRES_STATUS = "fitres.parameters", "fitres.status"
LEGACY_TENSOR_TYPE = "numpy.ndarray"


class PrivacyViolation(RuntimeError):
    """A reply tried to carry something other than scalar metrics (or a global update)."""


Layout = dict[str, tuple[int, ...]]


class MetricRule(NamedTuple):
    """What one reply metric may hold: kind "int" (an int, never a bool), "float" (a finite number)
    or "float|nan" (a finite number or a plain NaN: no payload bits), within [low, high] (inclusive;
    high = inf admits +inf)."""

    kind: str
    low: float
    high: float


COUNT_MAX = 10**9  # lifetime counters and per-round counts: far above any real device's
BYTES_MAX = 2**40  # 1 TiB: a buffer budget or an upload (a LoRA update) is far smaller
SECONDS_MAX = 1e7  # ~116 days: no device round takes longer
DEVICE_ID_MAX = 10**8 - 1
_SECONDS = MetricRule("float", 0.0, SECONDS_MAX)
_STAGE_SECONDS = MetricRule("float|nan", 0.0, SECONDS_MAX)  # NaN: a batch's filler for a stage a device never ran
_SHARE = MetricRule("float", 0.0, 1.0)  # ROUGE F-measures
_RATE = MetricRule("float|nan", 0.0, 1.0)  # an accept rate: NaN without a simulated user
_PERPLEXITY = MetricRule("float|nan", 1.0, math.inf)  # exp(mean NLL) >= 1; inf on overflow, NaN from a diverged model
_COUNT, _FLAG = MetricRule("int", 0, COUNT_MAX), MetricRule("int", 0, 1)

# THE allow-list: every metric name a reply may carry, with its rule. A device builds its reply only
# through build_reply / build_fit_reply / build_batch_reply, which refuse any other name or value,
# and the guard (clients/guard.py) refuses a reply that does not fit. The names are those of
# fedasls.device.round.DeviceRoundResult.metrics() (a train round), the ClientApp's evaluate and
# query handlers, the stage timer's stage_<name>_s / stage_<name>_cpu_s (fedasls.device.timing) and
# a batch reply's failed devices. tests/clients/test_metric_allow_list.py runs real rounds against it.
METRIC_RULES: dict[str, MetricRule] = {
    "device_id": MetricRule("int", 0, DEVICE_ID_MAX),
    "status_code": _FLAG,  # 0 completed, 1 offline
    "wall_seconds": _SECONDS,
    "new_interactions": _COUNT,
    "adapted": _FLAG,
    "examples": _COUNT,
    "epochs": MetricRule("int", 0, 10**6),
    "eval_items": _COUNT,
    "upload_bytes": MetricRule("int", 0, BYTES_MAX),
    "withheld_bytes": MetricRule("int", 0, BYTES_MAX),
    "annotations": _COUNT,
    "buffer_bytes": MetricRule("int", 0, BYTES_MAX),
    "lora_rank": MetricRule("int", 1, 2**16),
    **{f"{who}{name}": _SHARE for who in ("", "base_", "global_") for name in ("rouge1", "rougeL")},
    **{f"{who}perplexity": _PERPLEXITY for who in ("", "base_", "global_")},
    **{f"{who}rougeL_recall": _RATE for who in ("", "base_")},  # NaN: an evaluation saved before it was measured
    # fedasls.lm.cuts: prompts and training answers cut to fit the window this round (counts, and shares: NaN
    # where nothing was fitted)
    **{name: _COUNT for name in ("prompts", "prompts_cut", "questions_cut", "answers", "answers_cut",
                                 "answer_tokens", "answer_tokens_cut")},
    **{f"{name}_cut_share": _RATE for name in ("prompts", "answers", "answer_tokens")},
    "accept_rate": _RATE,
    "base_accept_rate": _RATE,
    "epsilon": MetricRule("float|nan", 0.0, math.inf),  # example-level DP-SGD; NaN without it
    "gate_accepted": _COUNT,
    "gate_rejected": _COUNT,
    "gate_waiting": _COUNT,
    "uses_global": _FLAG,
    "unclipped": _FLAG,  # adaptive clipping (fedasls.privacy.adaptive_clipping): 1 if the update's norm was <= C
    # "adopt": cold-start adoption (fedasls.device.global_round) is timed but not one of timing.STAGES
    **{f"stage_{name}{part}": _STAGE_SECONDS for name in (*STAGES, "adopt") for part in ("_s", "_cpu_s")},
    FAILED_IDS_KEY: MetricRule("int", 0, DEVICE_ID_MAX),  # a batch reply's failed devices, by id and code
    FAILED_CODES_KEY: MetricRule("int", min(FailureCode), max(FailureCode)),
}
_NAN_SIGN, _QUIET_NAN = 1 << 63, 0x7FF8000000000000
CLIP_TOLERANCE = 1e-4  # relative: an update clipped to C in float32 may exceed C by rounding


def check_metric(name: str, value: Any) -> None:
    """Raise PrivacyViolation unless `name` is on the allow-list (METRIC_RULES) and `value` fits its
    rule. The message names the metric and the rule, never the value."""
    rule = METRIC_RULES.get(name)
    if rule is None:
        raise PrivacyViolation(f"metric '{name}' is not on the allow-list (wire.messages.METRIC_RULES)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyViolation(f"metric '{name}' is not a number; only numbers may leave a device")
    if rule.kind == "int" and not isinstance(value, int):
        raise PrivacyViolation(f"metric '{name}' must be an integer")
    if isinstance(value, float) and math.isnan(value):
        if rule.kind != "float|nan":
            raise PrivacyViolation(f"metric '{name}' is NaN; it must be a finite number")
        if struct.unpack("<Q", struct.pack("<d", value))[0] & ~_NAN_SIGN != _QUIET_NAN:
            raise PrivacyViolation(f"metric '{name}' is a NaN with payload bits; only a plain NaN may leave")
        return
    if not rule.low <= value <= rule.high:
        raise PrivacyViolation(f"metric '{name}' is outside its range [{rule.low}, {rule.high}]")


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise PrivacyViolation unless every metric fits the allow-list. One device's reply holds
    scalars; a batch's (any value a list) holds a list per name, one number per device of
    'device_id' (the failed devices' ids and codes: two lists of their own length)."""
    values = dict(metrics)
    if not any(isinstance(v, list) for v in values.values()):
        for name, value in values.items():
            check_metric(name, value)
        return
    if any(not isinstance(v, list) for v in values.values()):
        raise PrivacyViolation("a batch reply's metrics must all be lists (one number per device)")
    ran = len(values.get("device_id", []))
    failed = len(values.get(FAILED_IDS_KEY, []))
    for name, column in values.items():
        if len(column) != (failed if name in (FAILED_IDS_KEY, FAILED_CODES_KEY) else ran):
            raise PrivacyViolation(f"batch metric '{name}' does not hold one number per device")
        for value in column:
            check_metric(name, value)


def check_update_values(arrays: Mapping[str, np.ndarray], clip_norm: float | None) -> None:
    """Raise PrivacyViolation unless the update's values are finite and its L2 norm (over all its
    tensors, as the device clips it: fedasls.privacy.clipping) is at most the round's clip_norm,
    with a relative tolerance of CLIP_TOLERANCE for float32 rounding. The message never quotes a value."""
    if clip_norm is None or not (math.isfinite(clip_norm) and clip_norm > 0):
        raise PrivacyViolation("the reply holds an update, but the round sent no valid clip_norm to bound it")
    total = 0.0
    for name, array in arrays.items():
        values = np.asarray(array)
        if not np.all(np.isfinite(values)):
            raise PrivacyViolation(f"update tensor '{name}' holds NaN or infinite values")
        total += float(np.square(values, dtype=np.float64).sum())
    if math.sqrt(total) > clip_norm * (1 + CLIP_TOLERANCE):
        raise PrivacyViolation("the update's L2 norm exceeds the round's clip_norm: it was not clipped on the device")



def build_reply(msg: Message, metrics: Mapping[str, float | int],
                update: Mapping[str, torch.Tensor] | None = None) -> Message:
    """The reply to `msg`: scalar metrics (names and values by the allow-list, METRIC_RULES; strings
    are refused) and, when given, the global-adapter update (it must fit the layout of the global
    adapter `msg` carried)."""
    clean: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrivacyViolation(f"metric '{key}' is {type(value).__name__}, only numbers may leave a device")
        clean[key] = value if isinstance(value, int) else float(value)
        check_metric(key, clean[key])
    records: dict = {METRICS_KEY: MetricRecord(clean)}
    if update is not None:
        records[GLOBAL_UPDATE_KEY] = _update_record(msg, update)
    return Message(RecordDict(records), reply_to=msg)


def _update_record(msg: Message, update: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A device's update as float32 on the CPU, refused unless it fits the global adapter `msg` carried."""
    import torch

    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in update.items()}
    check_update_layout(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()},
                         {k: str(v.dtype) for k, v in tensors.items()}, allowed_layout(msg))
    return ArrayRecord(tensors)


def batch_update_key(device_id: int) -> str:
    """The record under which a worker slot's batch reply carries one device's update."""
    return f"{GLOBAL_UPDATE_KEY}.{int(device_id)}"


def batch_update_device(key: str) -> int | None:
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
        elif (device_id := batch_update_device(key)) is not None:
            out[device_id] = torch_tensors(reply.content[key])
    return out


def downlink_records(downlink: Downlink) -> dict[str, ArrayRecord | ConfigRecord]:
    """A round's Downlink as records: its shared tensors (ArrayRecord) and its knobs (ConfigRecord)."""
    return {GLOBAL_ADAPTER_KEY: ArrayRecord(dict(downlink.shared)), DOWNLINK_KEY: _knobs(downlink)}


def _knobs(downlink: Downlink) -> ConfigRecord:
    return ConfigRecord({f.name: getattr(downlink, f.name) for f in fields(downlink) if f.name != "shared"})


def fetch_records(downlink: Downlink) -> dict[str, ConfigRecord]:
    """Phase 2 of a two-phase round: the downlink's knobs and its adapter's layout (names in order, shapes),
    not its tensors: the devices already hold them, the guard needs only what an update may look like."""
    names = list(downlink.shared)
    shapes = [tuple(int(d) for d in downlink.shared[k].shape) for k in names]
    layout = ConfigRecord({"names": names, "ranks": [len(shape) for shape in shapes],
                           "dims": [d for shape in shapes for d in shape]})
    return {ADAPTER_LAYOUT_KEY: layout, DOWNLINK_KEY: _knobs(downlink)}


def _fetch_layout(msg: Message) -> Layout | None:
    """The layout a phase-2 message (config with FETCH_UPDATE) names in its ADAPTER_LAYOUT_KEY record."""
    config = msg.content["config"] if "config" in msg.content else None
    record = msg.content[ADAPTER_LAYOUT_KEY] if ADAPTER_LAYOUT_KEY in msg.content else None
    if not isinstance(config, ConfigRecord) or FETCH_UPDATE not in config or not isinstance(record, ConfigRecord):
        return None
    names, ranks, dims = list(record["names"]), [int(r) for r in record["ranks"]], [int(d) for d in record["dims"]]
    if len(names) != len(ranks) or sum(ranks) != len(dims):
        return None
    layout, at = {}, 0
    for name, rank in zip(names, ranks):
        layout[str(name)], at = tuple(dims[at:at + rank]), at + rank
    return layout


def fit_downlink_config(content: RecordDict) -> dict[str, Any]:
    """A plain round's downlink knobs for a SecAgg+ round's FitIns config (keys "downlink.<knob>")."""
    return {f"{DOWNLINK_KEY}.{k}": v for k, v in content[DOWNLINK_KEY].items()}


def read_downlink(msg: Message) -> Downlink | None:
    """The Downlink a train or evaluate message carries (plain records, or a SecAgg+ round's FitIns),
    or None (a local round). Imports torch only when there is one."""
    if FIT_CONFIG in msg.content:
        import torch

        shared = {k: torch.from_numpy(a.copy()) for k, a in fit_adapter(msg).items()}
    elif GLOBAL_ADAPTER_KEY in msg.content:
        shared = torch_tensors(msg.content[GLOBAL_ADAPTER_KEY])
    else:
        return None
    from fedasls.federated.strategy import Downlink

    return Downlink(shared=shared, **downlink_knobs(msg))


def downlink_knobs(msg: Message) -> dict[str, Any] | None:
    """The round's Downlink knobs a message carries (also phase 2 of a two-phase round, which carries no
    tensors), or None (a local round)."""
    if FIT_CONFIG in msg.content:
        prefix = f"{DOWNLINK_KEY}."
        return {k[len(prefix):]: v for k, v in msg.content[FIT_CONFIG].items() if k.startswith(prefix)}
    if DOWNLINK_KEY in msg.content:
        return dict(msg.content[DOWNLINK_KEY])
    return None


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
        return _fetch_layout(msg)  # phase 2 of a two-phase round names the layout alone; any other message: None
    record = msg.content[GLOBAL_ADAPTER_KEY]
    if not isinstance(record, ArrayRecord):
        return None
    return {k: tuple(int(d) for d in a.shape) for k, a in record.items()}


def check_update_layout(names: list[str], shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str],
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


def unit_weight(msg: Message) -> int:
    """The weight every update of this SecAgg+ round must carry (DP: the unweighted sum), 0 if none."""
    if msg.has_error() or FIT_CONFIG not in msg.content:
        return 0
    return int(msg.content[FIT_CONFIG].get(UNIT_WEIGHT, 0))


def build_fit_reply(msg: Message, metrics: Mapping[str, float | int], update: Mapping[str, torch.Tensor] | None,
                    max_weight: float) -> Message:
    """The reply to a SecAgg+ round's FitIns, in Flower's FitRes layout, for `secaggplus_mod` to mask:
    the metrics and update are checked by `build_reply` (the same rules), the update's arrays go in
    the global adapter's order, and the weight is the example count capped at `max_weight` (SecAgg+
    scales by weight / max_weight and clips to the range, so a larger weight would be clipped). A
    device with no update sends zeros with weight 0 (every participant must send a vector). Under DP
    the FitIns names a unit weight (`UNIT_WEIGHT` = max_weight): every update carries exactly it, so the
    securely aggregated mean times the count is the unweighted sum DP-FedAvg noises."""
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
        weight = unit_weight(msg) or int(min(float(clean.get("examples", 0)), max_weight))
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


def error_reply(msg: Message, code: FailureCode) -> Message:
    """The reply of a failed device round: the code and its fixed message, nothing else."""
    return Message(Error(code=int(code), reason=code.message), reply_to=msg)


def build_batch_reply(msg: Message, rows: list[Mapping[str, float | int]],
                      failures: Mapping[int, FailureCode] | None = None,
                      updates: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> Message:
    """The reply of a worker slot that ran several devices: one MetricRecord whose every key holds a
    list with one number per device (in the order of the rows); numbers by the allow-list, as in `build_reply`.
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
    check_metrics(clean)  # the allow-list, as the guard checks it
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
