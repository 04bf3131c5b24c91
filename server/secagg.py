"""SecAgg+ secure aggregation of the global-adapter rounds, with Flower 1.41's own SecAggPlusWorkflow.

`secure_aggregation(settings, fleet)` wraps the run's fleet when [federated] secure_aggregation =
"secagg+". One object, `SecAggRound`, owns a round of the protocol from its first stage to its last;
the fleet loop (server/rounds.py) is unchanged and the round strategy is any strategy of the
protocol (fedasls.federated.strategy):

- `SecAggFleet.dispatch` starts a `SecAggRound` and runs the protocol's stages 0-2 (setup, share
  keys, masked vectors) for the devices the coordinator sampled. Flower's workflow asks a legacy
  Strategy for its FitIns: `_PlanStrategy.configure_fit` hands it exactly our devices, each with
  our round config, the downlink's knobs and the global adapter as the FitIns. The replies the loop
  gets are the devices' scalar metrics only; the round travels back in `Dispatched.secure`.
- The loop closes the round (K fastest, deadline, availability) as for plain rounds.
- `SecAggRound.contributions(completed)` runs stage 3 (unmask) for the devices in
  `outcome.completed`: a sampled device that did not complete (a straggler, or one that went
  offline in simulated time) is a SecAgg+ dropout: its masked vector is taken back out of the
  masked sum and the server rebuilds only its pairwise masks (never its private mask), so its
  update stays hidden and does not count, exactly as the plain path leaves it out. The round
  strategy receives the weighted mean as ONE contribution (device_id AGGREGATE, weight 1).

Node mapping: one protocol instance per round, one participant per SuperNode (the workflow keys
FitIns by node id, and `secaggplus_mod` keeps its state in the node's Context). On the Simulation
Engine's worker slots the sampled devices are zipped onto the slots, so a round may run at most as
many devices as there are slots (ceil(cohort_size x overcommit), one device per message; there are
no waves). On the Deployment Engine each device is its own node (tests/test_deployment.py runs one round).

What the server sees, per device: its public keys, the encrypted key shares it forwards, its
masked vector (uniform modulo 2**32 to anyone holding fewer than `threshold` of its shares), its
scalar metrics and its weight (FitRes metrics and num_examples are not masked), and in stage 3
its neighbours' key shares. Of the updates it learns only the weighted mean
sum_i w_i x_i / sum_i w_i over the completed devices, with w_i = min(examples_i, max_weight).

Precision: each device clips its update to L2 norm C = [federated] clip_norm, so every element
is in [-C, C]; Flower scales it by w_i / max_weight <= 1 and clips to +-clipping_range, so
clipping_range = C never clips. Values are stochastically rounded to Q = secagg_quantization_range
levels (step 2C/Q) and weights to multiples of 1/Q, so each element of the mean is off by at most
n (2C + X) / (Q sum_i q_i), X = the largest |element|, q_i = the quantized weight ratios
(`quantization_bound`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod, parameters_subtraction
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from wire.messages import (
    ADAPTER_NAMES,
    FIT_CONFIG,
    FITRES_METRICS,
    GLOBAL_ADAPTER_KEY,
    LEGACY_TENSOR_TYPE,
    METRICS_KEY,
    SECAGG_CONFIGS,
    UNIT_WEIGHT,
    fit_downlink_config,
)
from fedasls.config import Settings
from fedasls.device.faults import FailureCode
from fedasls.federated.secagg_cost import round_cost
from fedasls.federated.strategy import AGGREGATE, Contribution
from fedasls.privacy.dp_fedavg import summed_contribution
from server.fleets import Dispatched, Fleet, MessageFor, OnReplies, exchange

MODULUS = 2**32  # Flower's default mask modulus (the largest it allows)


def quantized_sensitivity(clip_norm: float, dims: int, quantization_range: int) -> float:
    """L2 sensitivity of SecAgg+'s dequantized sum of unit-weight updates (DP): a device's update has
    norm <= C and its stochastic rounding moves each of its d elements by less than one step 2C/Q, so
    adding or removing it moves the sum by at most C (1 + 2 sqrt(d) / Q)."""
    return clip_norm * (1.0 + 2.0 * math.sqrt(dims) / quantization_range)


def sum_quantization_bound(devices: int, clip_norm: float, quantization_range: int) -> float:
    """Largest per-element error of SecAgg+'s dequantized sum of `devices` unit-weight updates (DP)
    against the exact sum: each device's stochastic rounding is off by less than one step 2C/Q."""
    return devices * 2.0 * clip_norm / quantization_range


def quantization_bound(weights: list[float], clip_norm: float, max_weight: float, quantization_range: int,
                       largest: float | None = None) -> float:
    """Largest per-element error of SecAgg+'s weighted mean against the exact one, for n devices of
    these weights (their example counts, capped at max_weight), elements in [-C, C] (C = clip_norm
    = clipping_range), stochastic rounding to Q levels: n (2C + X) / (Q sum_i q_i), where X bounds
    the elements (default C) and q_i = round(Q w_i / max_weight) / Q are the quantized weight ratios."""
    q = quantization_range
    total = sum(round(w / max_weight * q) / q for w in weights)
    if total <= 0:
        return math.inf
    x = clip_norm if largest is None else largest
    return len(weights) * (2 * clip_norm + x) / (q * total)


class _PlanStrategy(Strategy):
    """The legacy Strategy the workflow calls: `configure_fit` returns this round's plan (our devices on
    their nodes, our FitIns), `aggregate_fit` keeps the securely aggregated mean. Nothing else is used."""

    def __init__(self, plan: list[tuple[ClientProxy, FitIns]]) -> None:
        self.plan = plan
        self.mean: list[np.ndarray] | None = None
        self.weights: list[int] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return list(self.plan)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Every FitRes carries the same aggregate (the workflow writes it into each); no single update.
        self.weights = [int(res.num_examples) for _, res in results]
        if results and sum(self.weights) > 0:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # we apply the step ourselves (SecAggStrategy), not through the LegacyContext

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _ProtocolGrid:
    """The grid the workflow drives. send_and_receive goes through our own push/pull (so a recording or
    auditing grid underneath sees every message), and stage 2's messages and replies are kept."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[str, list[Message]] = {}  # stage -> its error replies (a device's guard refusing, ...)
        self.asked: dict[str, Message] = {}  # message id -> every protocol message sent (any stage)
        self.sent: list[Message] = []  # stage 2: the FitIns messages
        self.replies: list[Message] = []  # stage 2: the masked vectors (or error replies)
        self.seconds: dict[int, float] = {}  # stage 2: node id -> seconds from send to reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage2 = any(FIT_CONFIG in m.content for m in messages)
        sent_at = time.monotonic()
        arrived: dict[int, float] = {}

        def timed(got: list[Message]) -> None:
            for reply in got:
                arrived[reply.metadata.src_node_id] = time.monotonic() - sent_at

        replies, _ = exchange(self.grid, messages, timeout_s=timeout, on_replies=timed)
        stage = str(messages[0].content[SECAGG_CONFIGS].get(Key.STAGE, "")) if SECAGG_CONFIGS in messages[0].content \
            else ""
        self.asked |= {m.metadata.message_id: m for m in messages}
        self.errors.setdefault(stage, []).extend(r for r in replies.values() if r.has_error())
        if stage2:
            self.sent, self.replies, self.seconds = messages, list(replies.values()), arrived
        return list(replies.values())


@dataclass
class SecAggRound:
    """One round of the protocol, from stage 0 (dispatch) to stage 3 (`contributions`)."""

    workflow: SecAggPlusWorkflow
    settings: Settings
    context: LegacyContext | None = None  # None: the round never reached stage 2 (no device trained)
    state: WorkflowState | None = None
    grid: _ProtocolGrid | None = None
    plan: _PlanStrategy | None = None
    node_of: dict[int, int] = field(default_factory=dict)  # device id -> node id
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)  # node id -> its masked vector
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the global adapter's names and shapes
    sampled: int = 0

    def unmask(self, completed: list[int]) -> bool:
        """Run stage 3 for the completed devices; the others become protocol dropouts. True if the
        aggregate was recovered."""
        state = self.state
        keep = {self.node_of[d] for d in completed if d in self.node_of} & state.active_node_ids
        if not keep:
            return False
        for node in sorted(state.active_node_ids - keep):  # late: take its masked vector back out of the sum
            state.aggregate_ndarrays = parameters_mod(
                parameters_subtraction(state.aggregate_ndarrays, self.masked[node]), state.mod_range)
        state.active_node_ids = set(keep)
        # Dead = nodes that were in stage 2 and are not kept. Flower counts every node of stage 0 instead, so a
        # node that left in setup or share-keys (say, its guard refused a reply) would be asked for a key
        # share no neighbour holds, and every device's unmask would fail.
        state.sampled_node_ids = {m.metadata.dst_node_id for m in self.grid.sent}
        state.legacy_results = [(p, r) for p, r in state.legacy_results if p.node_id in keep]
        with np.errstate(divide="ignore", invalid="ignore"):  # all weights 0: the mean is undefined (skipped)
            ok = self.workflow.unmask_stage(self.grid, self.context, state)
        return ok and self.plan.mean is not None

    def contributions(self, completed: list[int]) -> tuple[list[Contribution], dict[str, float]]:
        """The round's securely aggregated mean as one contribution (none if it was not recovered),
        and the protocol's figures for the round's row."""
        if self.state is None:
            return [], {"secagg_ok": 0, **refusals(self.grid)}
        ok = self.unmask(completed)
        f = self.settings.federated
        dropped = self.sampled - len(self.state.active_node_ids) if ok else self.sampled
        d = sum(int(np.prod(shape)) for shape in self.shapes.values())
        cost = round_cost(self.sampled, d, f.secagg_num_shares, f.secagg_reconstruction_threshold,
                          dropped=min(max(dropped, 0), self.sampled - 1))
        out: dict[str, float] = {
            "secagg_ok": int(ok), "secagg_devices": self.sampled, "secagg_dropouts": dropped,
            "secagg_neighbours": cost.neighbours, "secagg_threshold": cost.threshold,
            "secagg_bytes_up_per_device": cost.bytes_up_per_device,
            "secagg_bytes_down_per_device": cost.bytes_down_per_device, "secagg_server_bytes_in": cost.server_bytes_in,
            "contributors": sum(1 for w in self.plan.weights if w > 0) if ok else 0, **refusals(self.grid)}
        if f.dp:  # the realized count is derived from the clipped sum's support: not released (DPFedAvg may)
            out.pop("contributors")
        if not ok:
            return [], out
        if f.dp:  # unit weights: the mean times the devices that sent an update is the unweighted sum
            count = sum(1 for w in self.plan.weights if w > 0)
            total = {k: torch.from_numpy(np.asarray(a, dtype=np.float64) * count).float().reshape(shape)
                     for (k, shape), a in zip(self.shapes.items(), self.plan.mean)}
            return [summed_contribution(total, count, quantized_sensitivity(
                f.clip_norm, d, f.secagg_quantization_range))], out
        mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(shape)
                for (k, shape), a in zip(self.shapes.items(), self.plan.mean)}
        return [Contribution(AGGREGATE, mean, 1.0)], out


def _carried(pgrid: _ProtocolGrid, replies: list[Message], device_of: dict[int, int]) -> dict[str, list[int]]:
    """message id -> [device id] for the protocol messages these replies answer (so the loop can name them)."""
    out: dict[str, list[int]] = {}
    for reply in replies:
        sent = pgrid.asked.get(reply.metadata.reply_to_message_id)
        if sent is not None and sent.metadata.dst_node_id in device_of:
            out[sent.metadata.message_id] = [device_of[sent.metadata.dst_node_id]]
    return out


def refusals(pgrid: _ProtocolGrid | None) -> dict[str, int]:
    """The round row's `secagg_refused_<stage>`: per protocol stage, the replies a device's privacy guard
    replaced by the REFUSED code (stages 0-2 are also device failures "refused"; stage 3 comes after the
    round closed, so it is counted here only)."""
    errors = pgrid.errors if pgrid is not None else {}
    refused = int(FailureCode.REFUSED)
    return {f"secagg_refused_{stage}": sum(1 for r in errors.get(stage, []) if int(r.error.code) == refused)
            for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)}


def fit_ins(content: RecordDict, keep_device_id: bool = True, unit: int = 0) -> FitIns:
    """A plain round's downlink (config + global adapter) as legacy FitIns: the adapter's arrays in
    order as the parameters, the names and the round config as the config; with `unit` > 0 (DP) the
    weight every update must carry."""
    record = content[GLOBAL_ADAPTER_KEY]
    names = list(record.keys())
    config: dict[str, Any] = dict(content["config"])
    if not keep_device_id:
        config.pop("device-id", None)  # a Deployment Engine node knows which device it is
    config[ADAPTER_NAMES] = names
    config.update(fit_downlink_config(content))
    if unit:
        config[UNIT_WEIGHT] = unit
    params = Parameters([ndarray_to_bytes(record[k].numpy()) for k in names], LEGACY_TENSOR_TYPE)
    return FitIns(params, config)


class SecAggFleet:
    """A fleet whose dispatch starts a SecAggRound and runs its stages 0-2; the rest is the wrapped fleet's."""

    def __init__(self, inner: Fleet, settings: Settings) -> None:
        f = settings.federated
        self.inner = inner
        self.kind, self.simulated = inner.kind, inner.simulated
        self.settings = settings
        timeout = settings.deployment.reply_timeout_s if inner.kind == "nodes" else None
        self.workflow = SecAggPlusWorkflow(
            f.secagg_num_shares, f.secagg_reconstruction_threshold, max_weight=f.secagg_max_weight,
            clipping_range=f.clip_norm, quantization_range=f.secagg_quantization_range, modulus_range=MODULUS,
            timeout=timeout)
        self._seconds: dict[int, float] = {}
        # DP: every update weighs max_weight (an integer: settings check), so the mean is the unweighted one
        self.unit = int(f.secagg_max_weight) if f.dp else 0

    def connect(self, grid: Grid) -> None:
        self.inner.connect(grid)

    def sample(self, grid: Grid, coordinator, now: float) -> list[int]:
        return self.inner.sample(grid, coordinator, now)

    def dropouts(self, coordinator, sampled: list[int]) -> set[int]:
        return self.inner.dropouts(coordinator, sampled)

    def nodes(self, devices: list[int]) -> dict[int, int]:
        """device id -> the SuperNode that runs it this round (one device per node)."""
        if self.inner.kind == "slots":
            slots = list(self.inner.slots)
            if len(devices) > len(slots) and self.settings.simulation.sampling == "poisson":
                raise RuntimeError(
                    f"a SecAgg+ round under DP sampled a Poisson cohort of {len(devices)} devices for {len(slots)} "
                    f"worker slots (one SuperNode per device). The slots were sized so that this happens with "
                    f"probability at most [federated] secagg_slot_tail = {self.settings.federated.secagg_slot_tail:g} "
                    "a round; the run stops rather than truncate the cohort (a truncated cohort is not the Poisson "
                    "sample the epsilon assumes) and nothing of this round was released. Lower secagg_slot_tail (more "
                    "slots) and resume: fedasls simulate --resume RUN_DIR --set federated.secagg_slot_tail=1e-15")
            if len(devices) > len(slots):
                raise RuntimeError(
                    f"a SecAgg+ round needs one SuperNode per device, but {len(devices)} devices were sampled for "
                    f"{len(slots)} worker slots: start at least ceil(cohort_size x overcommit) SuperNodes")
            return dict(zip(devices, slots))
        return {d: self.inner.node_of[d] for d in devices}

    def dispatch(self, grid: Grid, devices: list[int], message_for: MessageFor, server_round: int,
                 on_replies: OnReplies | None = None) -> Dispatched:
        self._seconds = {}
        rnd = SecAggRound(self.workflow, self.settings)
        if len(devices) < 2:  # SecAgg+ cannot hide one update: such a round does not run
            return Dispatched([], unreachable=set(devices), secure=rnd)
        node_of = self.nodes(devices)
        keep_id = self.inner.kind == "slots"
        first = message_for(devices[0])
        plan = [(GridClientProxy(node_of[d], grid, 0),
                 fit_ins(first if i == 0 else message_for(d), keep_id, self.unit))
                for i, d in enumerate(devices)]
        strategy = _PlanStrategy(plan)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # our FitIns carry the adapter
        state, pgrid = WorkflowState(), _ProtocolGrid(grid)
        rnd.grid = pgrid
        shapes = {k: tuple(int(n) for n in a.shape) for k, a in first[GLOBAL_ADAPTER_KEY].items()}
        wf = self.workflow
        device_of = {n: dev for dev, n in node_of.items()}
        exchanged = wf.setup_stage(pgrid, context, state) and wf.share_keys_stage(pgrid, context, state)
        # A device that failed the key exchange (its guard refused its reply, or it erred) never trains: its
        # error reply goes to the loop like a plain round's, so a refusal is counted as one.
        early = [r for stage in (Stage.SETUP, Stage.SHARE_KEYS) for r in pgrid.errors.get(stage, [])]
        if not exchanged:  # no device trained
            carried = _carried(pgrid, early, device_of)
            failed = {d for ids in carried.values() for d in ids}
            return Dispatched(early, unreachable=set(devices) - failed, devices=carried, secure=rnd)
        wf.collect_masked_vectors_stage(pgrid, context, state)
        rnd.context, rnd.state, rnd.plan = context, state, strategy
        rnd.node_of, rnd.shapes, rnd.sampled = node_of, shapes, len(devices)
        replies: list[Message] = list(early)
        carried = _carried(pgrid, early, device_of)
        by_id = {m.metadata.message_id: m for m in pgrid.sent}
        for m in pgrid.sent:
            carried[m.metadata.message_id] = [device_of[m.metadata.dst_node_id]]
        for reply in pgrid.replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                replies.append(reply)
                continue
            rnd.masked[node] = [bytes_to_ndarray(b) for b in reply.content[SECAGG_CONFIGS][Key.MASKED_PARAMETERS]]
            metrics = MetricRecord(dict(reply.content[FITRES_METRICS]))  # the device's scalars, not masked
            replies.append(Message(RecordDict({METRICS_KEY: metrics}), reply_to=by_id[reply.metadata.reply_to_message_id]))
            self._seconds[device_of[node]] = pgrid.seconds.get(node, 0.0)
        if on_replies is not None:
            on_replies(replies)
        asked = {device_of[m.metadata.dst_node_id] for m in pgrid.sent}
        answered = {device_of[r.metadata.src_node_id] for r in pgrid.replies}
        failed_early = {d for r in early for d in carried.get(r.metadata.reply_to_message_id, [])}
        unreachable = (set(devices) - asked - failed_early) | (asked - answered if self.inner.kind == "nodes" else set())
        return Dispatched(replies, unreachable=unreachable, devices=carried, secure=rnd)

    def durations(self, results: dict[int, dict[str, Any]]) -> dict[int, float]:
        if self.inner.simulated:
            return self.inner.durations(results)
        return {d: self._seconds[d] for d, m in results.items() if m["status_code"] == 0 and d in self._seconds}

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "secure_aggregation": "secagg+"}


def secure_aggregation(settings: Settings, fleet: Fleet) -> Fleet:
    """The fleet a run uses: unchanged, or wrapped for SecAgg+ ([federated] secure_aggregation)."""
    if settings.federated.secure_aggregation == "none":
        return fleet
    return SecAggFleet(fleet, settings)
