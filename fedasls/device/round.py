"""One device's part in one federated round, without Flower: load, catch up, adapt, evaluate, save.

The ClientApp calls `run_device_round`; tests and benchmarks can call it in a plain loop. A device
reports the work it did (`RoundWork`) and how long it really took; simulated seconds and
availability are the simulated fleet's business (`fedasls.sim.simulated_timing`), which passes a
`keep` rule: a simulated device that goes offline before it finishes loses the round's work (its
state is not saved).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from fedasls.config import Settings
from fedasls.sim.cost_model import RoundWork
from fedasls.device.device import AdaptReport, Device
from fedasls.device.stream import advance
from fedasls.device.global_round import ClippedUpdate, adapt_from_global
from fedasls.federated.strategy import Downlink
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.interaction import STREAM_EPOCH
from fedasls.device.worker import DeviceRuntime
from fedasls.device.store import MANIFEST, CorruptStateError, DeviceStore
from fedasls.device.timing import record, stage
from fedasls.lm.cuts import record as record_cuts

UPLOAD_BYTES = 512  # a reply of scalar metrics; a later global-adapter update adds its own bytes


def keep_always(work: RoundWork) -> bool:
    """A real device keeps every round it finishes."""
    return True


@dataclass
class DeviceRoundResult:
    """Scalar outcome of one device round (what may leave the device: numbers only)."""

    device_id: int
    status: str  # "completed" | "offline" (a device that raises is reported by Flower as an error reply)
    wall_seconds: float  # real seconds the round took where it ran
    new_interactions: int
    adapted: int
    examples: int
    epochs: int
    eval_items: int
    upload_bytes: int
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
    gate_accepted: int = 0  # the device's lifetime count of adapters the gate kept
    gate_rejected: int = 0  # ... refused (the device kept its previous adapter or the base model)
    gate_waiting: int = 0  # ... adaptation steps that trained nothing (too few labelled items)
    uses_global: int = 0  # 1: no adapter of its own, the device uses the global adapter it adopted (cold_adoption)
    unclipped: int | None = None  # adaptive clipping only (downlink.report_unclipped): 1 if the update's norm was <= C
    withheld_bytes: int = 0  # update bytes not sent: the device finished past the deadline (upload_bytes counts them)
    contribution: ClippedUpdate | None = None  # global-adapter update (clipped, padded); never a metric
    rougeL_recall: float = math.nan  # ROUGE-L recall: the length-aware figure beside the F-measures
    base_rougeL_recall: float = math.nan
    stage_seconds: dict[str, float] = field(default_factory=dict)  # fedasls.device.timing: stage_<name>_s / _cpu_s
    cuts: dict[str, float | int] = field(default_factory=dict)  # fedasls.lm.cuts: prompts / answers cut to fit

    @property
    def work(self) -> RoundWork:
        return RoundWork.from_metrics(self.metrics())

    def metrics(self) -> dict[str, float | int]:
        """Numbers only, for the reply's MetricRecord (status as a code: 0 completed, 1 offline). Every
        name and value must fit the reply's allow-list (wire.messages.METRIC_RULES: a new field or
        timed stage goes there too; tests/clients/test_metric_allow_list.py checks both)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("status", "contribution", "stage_seconds", "cuts")
               and not (f.name == "unclipped" and self.unclipped is None)}  # sent only when the round asks
        out["status_code"] = {"completed": 0, "offline": 1}[self.status]
        out.update(self.stage_seconds)
        out.update(self.cuts)
        return out


def load_device(device_id: int, runtime: DeviceRuntime, settings: Settings, store: DeviceStore,
                heterogeneity: HeterogeneityModel) -> Device:
    """The device as last saved, or a new one sized by its heterogeneity profile."""
    state = store.load(device_id)
    if state is not None:
        try:
            return Device.from_state(state, runtime, settings)
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # stored, but not a device we can rebuild
            folder = store.folder(device_id)
            raise CorruptStateError(device_id, folder / MANIFEST, f"not a loadable device state: {err}", folder) from None
    profile = heterogeneity.profile(device_id)
    return Device(device_id, runtime, settings, lora_rank=min(profile.max_lora_rank, settings.adaptation.lora_rank),
                  buffer_bytes=profile.buffer_bytes(settings.selection.buffer_bytes))


def run_device_round(
    device_id: int,
    now: float,
    runtime: DeviceRuntime,
    settings: Settings,
    store: DeviceStore,
    heterogeneity: HeterogeneityModel,
    keep: Callable[[RoundWork], bool] = keep_always,
    downlink: Downlink | None = None,
    withhold: Callable[[RoundWork], bool] | None = None,
) -> DeviceRoundResult:
    """Run device `device_id` at (virtual) time `now`; persist its state if `keep(work)` says so.
    If `withhold(work)` says the round finishes too late to count (a straggler past the deadline: see
    SimulatedTiming.past_deadline), the update is not sent: the result has no contribution and
    `withheld_bytes` its size (`upload_bytes`, which times the round, still counts it, so the server
    classes the device exactly as if it had uploaded).

    With a `downlink` (a global-adapter round) the device observes its new interactions and, if it
    has buffered items, trains once starting from the global adapter (not on its own trigger); the
    result carries its contribution. The result's `stage_seconds` holds the round's per-stage wall
    and CPU times (fedasls.device.timing); its `cuts` what the prompt-length and long-answer policies cut
    (fedasls.lm.cuts: generated prompts and training examples).
    """
    with record() as timer, record_cuts() as cuts:
        result = _run_device_round(device_id, now, runtime, settings, store, heterogeneity, keep, downlink)
    if result.contribution is not None and withhold is not None and withhold(result.work):
        result.withheld_bytes = _nbytes(result.contribution.update)
        result.contribution, result.unclipped = None, None  # nothing of the update leaves, nor its clipping bit
    result.stage_seconds = timer.metrics()
    result.cuts = cuts.metrics()
    return result


def _run_device_round(device_id: int, now: float, runtime: DeviceRuntime, settings: Settings, store: DeviceStore,
                      heterogeneity: HeterogeneityModel,
                      keep: Callable[[RoundWork], bool], downlink: Downlink | None) -> DeviceRoundResult:
    t0 = time.perf_counter()
    with stage("load_state"):
        device = load_device(device_id, runtime, settings, store, heterogeneity)
    contribution = None
    if downlink is None:
        progress = advance(device, until=STREAM_EPOCH + now)
        new, examples, reports = progress.new_interactions, progress.examples, progress.adaptations
    else:
        new = device.catch_up(until=STREAM_EPOCH + now)
        reports = []
        if len(device.selector.buffer) > 0:
            contribution = adapt_from_global(device, downlink)
            reports = [AdaptReport(**device.counters.history[-1])]
        examples = sum(r.examples for r in reports)
    adapted = bool(reports)
    had_base = device.base_eval is not None
    # In a local round the device's model changes only when its gate accepts a new adapter; after a
    # rejection (the kept adapter is put back) or a wait, the held-out evaluation would give the
    # saved figures again (greedy answers, seeded user): they are reused, not recomputed.
    changed = downlink is not None or any(r.status == "accepted" for r in reports)
    if changed or device.last_eval is None:
        personal, base = device.evaluate()
    else:  # adapter and held-out items unchanged since the saved evaluation: the same figures
        personal, base = device.last_eval, device.base_eval
    trained = [r for r in reports if r.epochs]
    epoch_examples = sum(r.examples * r.epochs * r.attempts for r in trained)
    work = RoundWork(
        embed_items=new,
        train_examples=examples,
        # epochs actually run (early stopping, retried candidates), per training example
        epochs=round(epoch_examples / examples) if examples else settings.adaptation.epochs,
        rank=device.lora_rank,
        # held-out evaluation, the gate scoring the kept adapter and each candidate on the held-back items, and
        # cold-start adoption answering its questions with both models
        eval_items=personal.n * (1 if had_base else 2) + sum((1 + r.attempts) * r.heldback for r in trained)
        + 2 * device.compared,
        upload_bytes=UPLOAD_BYTES + (_nbytes(contribution.update) if contribution else 0),
    )
    kept = keep(work)
    if kept:
        with stage("save"):
            store.save(device_id, device.to_state())
    last = device.counters.history[-1] if (adapted and device.counters.history) else {}
    return DeviceRoundResult(
        device_id=device_id,
        status="completed" if kept else "offline",
        wall_seconds=time.perf_counter() - t0,
        new_interactions=new,
        adapted=int(adapted),
        examples=examples,
        epochs=work.epochs,
        eval_items=work.eval_items,
        upload_bytes=work.upload_bytes,
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
        rougeL_recall=personal.rougeL_recall,
        base_rougeL_recall=base.rougeL_recall,
        epsilon=last.get("epsilon") if last.get("epsilon") is not None else math.nan,
        gate_accepted=device.counters.gate_accepted,
        gate_rejected=device.counters.gate_rejected,
        gate_waiting=device.counters.gate_waiting,
        uses_global=int(device.adapter is None and device.shared_model is not None),
        contribution=contribution if kept else None,
        unclipped=unclipped_bit(downlink, contribution if kept else None),
    )


def unclipped_bit(downlink: Downlink | None, contribution: ClippedUpdate | None) -> int | None:
    """Adaptive clipping's bit (None unless the round asks for it): 1 if the update's norm before
    clipping was at most the round's C, else 0. A device that sends no update reports 1 (the zero update
    it contributes fits C; the server counts only the bits of devices that sent an update)."""
    if downlink is None or not downlink.report_unclipped:
        return None
    return 1 if contribution is None else int(contribution.norm <= downlink.clip_norm)


def _nbytes(tensors: Mapping) -> int:
    return sum(int(t.numel()) * t.element_size() for t in tensors.values())
