"""One device's part in one federated round, without Flower: load, catch up, adapt, evaluate, save.

The ClientApp calls `run_device_round`; tests and benchmarks can call it in a plain loop. The
device's simulated duration comes from its heterogeneity profile and the cost model; a device
that goes offline before it finishes loses the round's work (its state is not saved).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fedasls.device import Device, DeviceOptions
from fedasls.heterogeneity import CostModel, HeterogeneityModel
from fedasls.interaction import STREAM_EPOCH
from fedasls.runtime import DeviceRuntime
from fedasls.store import DeviceStore
from fedasls.timing import record, stage

UPLOAD_BYTES = 512  # a reply of scalar metrics; a later global-adapter update adds its own bytes


@dataclass
class DeviceRoundResult:
    """Scalar outcome of one device round (what may leave the device: numbers only)."""

    device_id: int
    status: str  # "completed" | "offline" (a device that raises is reported by Flower as an error reply)
    sim_seconds: float
    new_interactions: int
    adapted: int
    examples: int
    annotations: int
    buffer_bytes: int
    lora_rank: int
    rouge1: float
    rougeL: float
    perplexity: float
    accept_rate: float
    base_rouge1: float
    base_rougeL: float
    base_perplexity: float
    base_accept_rate: float
    epsilon: float
    stage_seconds: dict[str, float] = field(default_factory=dict)  # fedasls.timing: stage_<name>_s / _cpu_s

    def metrics(self) -> dict[str, float | int]:
        """Numbers only, for the reply's MetricRecord (status as a code: 0 completed, 1 offline)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("status", "stage_seconds")}
        out["status_code"] = {"completed": 0, "offline": 1}[self.status]
        out.update(self.stage_seconds)
        return out


def load_device(device_id: int, runtime: DeviceRuntime, store: DeviceStore, heterogeneity: HeterogeneityModel,
                options: DeviceOptions | None = None) -> Device:
    """The device as last saved, or a new one sized by its heterogeneity profile."""
    state = store.load(device_id)
    if state is not None:
        return Device.from_state(state, runtime, options)
    profile = heterogeneity.profile(device_id)
    return Device(device_id, runtime, lora_rank=min(profile.max_lora_rank, runtime.settings.adaptation.lora_rank),
                  buffer_bytes=profile.buffer_bytes, options=options)


def run_device_round(
    device_id: int,
    now: float,
    runtime: DeviceRuntime,
    store: DeviceStore,
    heterogeneity: HeterogeneityModel,
    cost: CostModel | None = None,
    options: DeviceOptions | None = None,
) -> DeviceRoundResult:
    """Run device `device_id` at virtual time `now` and persist its state if it stays online.

    The result's `stage_seconds` holds the round's per-stage wall and CPU times (fedasls.timing).
    """
    with record() as timer:
        result = _run_device_round(device_id, now, runtime, store, heterogeneity, cost, options)
    result.stage_seconds = timer.metrics()
    return result


def _run_device_round(device_id: int, now: float, runtime: DeviceRuntime, store: DeviceStore,
                      heterogeneity: HeterogeneityModel, cost: CostModel | None,
                      options: DeviceOptions | None) -> DeviceRoundResult:
    cost = cost or CostModel()
    profile = heterogeneity.profile(device_id)
    with stage("load_state"):
        device = load_device(device_id, runtime, store, heterogeneity, options)
    new = device.catch_up(until=STREAM_EPOCH + now)
    examples = 0
    adapted = device.should_adapt()
    if adapted:
        examples = device.adapt().examples
    had_base = device.base_eval is not None
    if adapted or device.last_eval is None:
        personal, base = device.evaluate()
    else:  # adapter and held-out items unchanged since the saved evaluation: the same figures, not recomputed
        personal, base = device.last_eval, device.base_eval
    work = {
        "embed_items": new,
        "train_examples": examples,
        "epochs": runtime.settings.adaptation.epochs,
        "rank": device.lora_rank,
        "eval_items": personal.n * (1 if had_base else 2),
        "upload_bytes": UPLOAD_BYTES,
    }
    seconds = cost.round_seconds(profile, work)
    finished_online = profile.availability.is_available(now) and profile.availability.next_change(now) >= now + seconds
    status = "completed" if finished_online else "offline"
    if finished_online:
        with stage("save"):
            store.save(device_id, device.to_state())
    last = device.counters.history[-1] if (adapted and device.counters.history) else {}
    return DeviceRoundResult(
        device_id=device_id,
        status=status,
        sim_seconds=seconds,
        new_interactions=new,
        adapted=int(adapted),
        examples=examples,
        annotations=device.counters.annotations,
        buffer_bytes=device.selector.buffer.used_bytes,
        lora_rank=device.lora_rank,
        rouge1=personal.rouge1,
        rougeL=personal.rougeL,
        perplexity=personal.perplexity,
        accept_rate=personal.accept_rate if personal.accept_rate is not None else math.nan,
        base_rouge1=base.rouge1,
        base_rougeL=base.rougeL,
        base_perplexity=base.perplexity,
        base_accept_rate=base.accept_rate if base.accept_rate is not None else math.nan,
        epsilon=last.get("epsilon") if last.get("epsilon") is not None else math.nan,
    )
