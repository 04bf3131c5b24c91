"""Flower ClientApp: each train call runs one device's round from the device store.

Two kinds of fleet call it (see server/rounds.py):
- worker slots (simulation): the message names the device ("device-id", or "device-ids" for
  several devices run side by side on one slot) and asks for simulated timing;
- device nodes (Deployment Engine): the SuperNode *is* the device; its node config names its
  `partition-id` and its own `store-dir`, and the server learns which node is which device with a
  QUERY message answered by `query` below (the server never sees node_config).

The base model is loaded once per worker process and reused; only LoRA tensors are swapped per
device. Replies pass the privacy guard.

SecAgg+ rounds (server/secagg.py) arrive as Flower's SecAggPlusWorkflow sends them: four stages,
each a message of type "train" carrying the protocol record. `secagg_route` sends exactly those
through Flower's `secaggplus_mod` (plain rounds go straight to `train`). A separate "train.secagg"
action cannot serve them: the workflow hard-codes message type "train" in every stage, and
`secaggplus_mod` passes through any other type untouched. In the masked-vector stage the mod calls
`train`, which sees the legacy FitIns layout and runs the same device round (`secagg_train`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from wire.messages import (
    FETCH_UPDATE,
    FIT_CONFIG,
    KEEP_UPDATE,
    SECAGG_CONFIGS,
    build_batch_reply,
    build_fit_reply,
    build_reply,
    read_downlink,
)
from clients.guard import privacy_guard, unmasked_guard

if TYPE_CHECKING:
    import torch

    from fedasls.config import Settings
    from fedasls.device.round import DeviceRoundResult
    from fedasls.federated.strategy import Downlink
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from fedasls.device.worker import DeviceRuntime

# The device library (torch, transformers) is imported on first use, not at import: on the
# Deployment Engine every message starts a fresh ClientApp process, and a QUERY needs none of it.
_WORKER: dict[str, tuple[Settings, DeviceRuntime, HeterogeneityModel]] = {}


def worker_resources(settings_json: str) -> tuple[Settings, DeviceRuntime, HeterogeneityModel]:
    """The run's settings and this process's runtime for them, built on first use (one base model per
    process; a runtime is reused across runs that load the same model and population)."""
    import torch

    from fedasls.config import Settings
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from fedasls.device.worker import DeviceRuntime, resource_key

    key = hashlib.sha256(settings_json.encode()).hexdigest()
    if key not in _WORKER:
        settings = Settings.model_validate_json(settings_json)
        shared = next((rt for _, rt, _ in _WORKER.values() if rt.key == resource_key(settings)), None)
        _WORKER.clear()  # a new run in the same process: drop the old model unless it is the same
        sim = settings.simulation  # a batching slot runs all its devices in this one process
        torch.set_num_threads(max(1, int(sim.cpus_per_worker * (sim.devices_per_worker if sim.batch_devices else 1))))
        runtime = shared or DeviceRuntime(settings)
        _WORKER[key] = (settings, runtime, HeterogeneityModel.from_settings(settings.heterogeneity))
    return _WORKER[key]


def device_round(settings_json: str, device_id: int, now: float, store_dir: str, simulated_timing: bool,
                 downlink: Downlink | None = None, server_round: int | None = None,
                 withhold_late: bool = True, keep_token: str | None = None) -> DeviceRoundResult:
    """Run one device round in this process. Simulated devices keep their state only if they finish
    inside their availability window; real devices always keep it. A simulated device that finishes
    past [simulation] deadline_s does not send its update (`withhold_late`, unless
    simulation.withhold_late_updates is off; a SecAgg+ round must send its masked vector anyway). The store is opened for
    `server_round` (an unrecorded attempt of that round is rolled back); a failure raises
    DeviceFailure, its traceback kept in the device's errors.log. With `keep_token` (phase 1 of a
    two-phase round) the update stays on the device (fedasls.device.kept_update), bound to that token:
    the result has no contribution and `withheld_bytes` its size until phase 2 asks for it."""
    from fedasls.device import kept_update
    from fedasls.device.round import keep_always, run_device_round
    from fedasls.device.faults import contained
    from fedasls.sim.cost_model import CostModel
    from fedasls.sim.simulated_timing import SimulatedTiming
    from fedasls.device.store import DeviceStore
    from fedasls.device.timing import record, stage

    store = DeviceStore(store_dir, round=server_round)
    with contained(device_id, store):
        with record() as timer:  # the reply carries per-stage seconds (numbers only), see fedasls.device.timing
            with stage("worker_setup"):  # the base model loads on a worker's first call only
                settings, runtime, hetero = worker_resources(settings_json)
            timing = SimulatedTiming(hetero, CostModel(settings.cost))
            keep = timing.keep_if_online(device_id, now) if simulated_timing else keep_always
            late = (timing.past_deadline(device_id, settings.simulation.deadline_s)
                    if simulated_timing and withhold_late and settings.simulation.withhold_late_updates else None)
            result = run_device_round(device_id, now, runtime, settings, store, hetero, keep=keep, downlink=downlink,
                                      withhold=late)
            if keep_token is not None:  # phase 1: keep the update (or drop a stale one), send metrics only
                folder = store.folder(device_id)
                if result.contribution is None:
                    kept_update.discard(folder)
                else:
                    with stage("save"):
                        result.withheld_bytes = kept_update.keep(folder, keep_token, result.contribution.update)
                    result.contribution = None  # its unclipped bit (adaptive clipping) is still reported
        result.stage_seconds = timer.metrics()  # this call's stages, the worker's setup included
        return result


def device_round_reply(settings_json: str, device_id: int, now: float, store_dir: str, simulated_timing: bool,
                       server_round: int | None = None, downlink: Downlink | None = None,
                       keep_token: str | None = None
                       ) -> tuple[dict[str, float | int], dict[str, torch.Tensor] | None]:
    """Run one device round in this process (one of a worker slot's batch); its reply metrics and
    its global-adapter update (None in a local round, when it trained nothing, or kept it: phase 1)."""
    result = device_round(settings_json, device_id, now, store_dir, simulated_timing, downlink, server_round,
                          keep_token=keep_token)
    return result.metrics(), (result.contribution.update if result.contribution else None)


def _batch_model(settings_json: str) -> object | None:
    """This process's shared model when the run batches a slot's devices (simulation.batch_devices), else None
    (also when the worker cannot load: each device then reports that failure itself)."""
    import json

    if not json.loads(settings_json).get("simulation", {}).get("batch_devices", False):
        return None
    try:
        return worker_resources(settings_json)[1].model
    except Exception:  # noqa: BLE001 - reported per device by device_round's contained()
        return None


def _config(msg: Message):
    """The round config: plain rounds' "config" record, or a SecAgg+ round's FitIns config."""
    return msg.content[FIT_CONFIG] if FIT_CONFIG in msg.content else msg.content["config"]


def device_id_of(msg: Message, context: Context) -> int:
    config = _config(msg)
    if "device-id" in config:
        return int(config["device-id"])
    return node_device_id(context)


def node_device_id(context: Context) -> int:
    """The device this SuperNode is (Deployment Engine: `--node-config "partition-id=N"`)."""
    if "partition-id" not in context.node_config:
        raise KeyError("this SuperNode has no partition-id: start it with --node-config \"partition-id=N\"")
    return int(context.node_config["partition-id"])


def _store_dir(msg: Message, context: Context) -> str:
    return str(context.node_config.get("store-dir", _config(msg)["store"]))


def _round_of(config) -> int | None:
    return int(config["server-round"]) if "server-round" in config else None


def _round_request(msg: Message, context: Context) -> tuple[str, float, str, bool, int | None]:
    """(settings JSON, virtual now, store folder, simulated timing?, server round) of a train message."""
    config = _config(msg)
    return (str(config["settings"]), float(config["now"]), _store_dir(msg, context),
            bool(config.get("simulated-timing", False)), _round_of(config))


app = ClientApp(mods=[privacy_guard])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which device this node is: the node's partition-id, as a number (node_config stays here)."""
    return build_reply(msg, {"device_id": node_device_id(context)})


def secagg_route(msg: Message, context: Context, call_next) -> Message:
    """Handler mod: SecAgg+ protocol messages (they carry its record) go through Flower's secaggplus_mod;
    the FitRes it masks is checked first by the guard's rules (`unmasked_guard`: layout, finite,
    clip_norm), as the masked vector that leaves cannot be."""
    if SECAGG_CONFIGS in msg.content:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, unmasked_guard(call_next))
    return call_next(msg, context)


def secagg_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's device round (masked-vector stage): the same round as `train`, replying in the
    FitRes layout that secaggplus_mod masks (clipped to [federated] clip_norm on the device)."""
    settings_json, now, store, simulated, server_round = _round_request(msg, context)
    result = device_round(settings_json, device_id_of(msg, context), now, store, simulated,
                          read_downlink(msg), server_round, withhold_late=False)
    settings = worker_resources(settings_json)[0]
    return build_fit_reply(msg, result.metrics(), result.contribution.update if result.contribution else None,
                           settings.federated.secagg_max_weight)


@app.train(mods=[secagg_route])
def train(msg: Message, context: Context) -> Message:
    """Catch up the stream to the (virtual) time, adapt if the trigger says so, evaluate, save."""
    if FIT_CONFIG in msg.content:
        return secagg_train(msg, context)
    config = msg.content["config"]
    if FETCH_UPDATE in config:  # phase 2 of a two-phase round: the kept update, nothing else
        return fetch_kept_updates(msg, context)
    settings_json, now, store, simulated, server_round = _round_request(msg, context)
    keep_token = str(config[KEEP_UPDATE]) if KEEP_UPDATE in config else None
    if "device-ids" in config:  # a worker slot running several devices side by side
        from functools import partial

        from clients.device_pool import run_devices

        downlink = read_downlink(msg)
        results, failures = run_devices(partial(device_round_reply, downlink=downlink, keep_token=keep_token),
                                        settings_json,
                                        [int(d) for d in config["device-ids"]], now, store, simulated,
                                        int(config.get("parallel", 1)), server_round,
                                        batch_model=_batch_model(settings_json))
        updates = {int(m["device_id"]): u for m, u in results if u is not None}
        return build_batch_reply(msg, [m for m, _ in results], failures, updates)
    downlink = read_downlink(msg)
    result = device_round(settings_json, device_id_of(msg, context), now, store, simulated, downlink, server_round,
                          keep_token=keep_token)
    return build_reply(msg, result.metrics(), result.contribution.update if result.contribution else None)


def fetch_kept_updates(msg: Message, context: Context) -> Message:
    """Phase 2 of a two-phase round: each asked device's kept update for the message's round token
    (metrics: its device id only), through the same reply builders (and the guard: layout, finite,
    clip_norm, as any update). A device that holds none for the token fails with NO_KEPT_UPDATE."""
    from fedasls.device import kept_update
    from fedasls.device.faults import DeviceFailure, FailureCode
    from fedasls.device.store import DeviceStore

    config = msg.content["config"]
    token, store = str(config[FETCH_UPDATE]), DeviceStore(_store_dir(msg, context))
    ids = [int(d) for d in config["device-ids"]] if "device-ids" in config else [device_id_of(msg, context)]
    updates = {d: u for d in ids if (u := kept_update.take(store.folder(d), token)) is not None}
    if "device-ids" not in config:
        if ids[0] not in updates:
            raise DeviceFailure(FailureCode.NO_KEPT_UPDATE, ids[0])
        return build_reply(msg, {"device_id": ids[0]}, updates[ids[0]])
    failures = {d: FailureCode.NO_KEPT_UPDATE for d in ids if d not in updates}
    return build_batch_reply(msg, [{"device_id": d} for d in updates], failures, updates)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized vs base metrics on the device's held-out interactions; state is not changed."""
    from fedasls.lm.lora import adapter_state
    from fedasls.device.round import load_device
    from fedasls.device.faults import contained
    from fedasls.device.global_round import global_model_adapter
    from fedasls.device.store import DeviceStore

    config = msg.content["config"]
    device_id, store = device_id_of(msg, context), DeviceStore(_store_dir(msg, context))
    with contained(device_id, store):
        settings, runtime, hetero = worker_resources(str(config["settings"]))
        device = load_device(device_id, runtime, settings, store, hetero)
        personal, base = device.evaluate()
    metrics = {"device_id": device_id, "rouge1": personal.rouge1, "rougeL": personal.rougeL,
               "perplexity": personal.perplexity, "base_rouge1": base.rouge1, "base_rougeL": base.rougeL,
               "base_perplexity": base.perplexity}
    downlink = read_downlink(msg)
    if downlink is not None:  # the global adapter alone on this device (state not saved)
        device.adapter = global_model_adapter(adapter_state(runtime.activate(device.lora_rank, settings.adaptation)), downlink)
        shared, _ = device.evaluate()
        metrics |= {"global_rouge1": shared.rouge1, "global_rougeL": shared.rougeL, "global_perplexity": shared.perplexity}
    return build_reply(msg, metrics)
