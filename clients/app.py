"""Flower ClientApp: each train call runs one device's round from the device store.

Two kinds of fleet call it (see server/fleet.py):
- worker slots (simulation): the message names the device ("device-id", or "device-ids" for
  several devices run side by side on one slot) and asks for simulated timing;
- device nodes (Deployment Engine): the SuperNode *is* the device; its node config names its
  `partition-id` and its own `store-dir`, and the server learns which node is which device with a
  QUERY message answered by `query` below (the server never sees node_config).

The base model is loaded once per worker process and reused; only LoRA tensors are swapped per
device. Replies pass the privacy guard.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.reply import GLOBAL_ADAPTER_KEY, build_batch_reply, build_reply, privacy_guard

if TYPE_CHECKING:
    from fedasls.config import Settings
    from fedasls.device_round import DeviceRoundResult
    from fedasls.federated.client import Downlink
    from fedasls.heterogeneity import HeterogeneityModel
    from fedasls.runtime import DeviceRuntime

# The device library (torch, transformers) is imported on first use, not at import: on the
# Deployment Engine every message starts a fresh ClientApp process, and a QUERY needs none of it.
_WORKER: dict[str, tuple[Settings, DeviceRuntime, HeterogeneityModel]] = {}


def worker_resources(settings_json: str) -> tuple[Settings, DeviceRuntime, HeterogeneityModel]:
    """The run's settings and this process's runtime for them, built on first use (one base model per
    process; a runtime is reused across runs that load the same model and population)."""
    import torch

    from fedasls.config import Settings
    from fedasls.heterogeneity import HeterogeneityModel
    from fedasls.runtime import DeviceRuntime, resource_key

    key = hashlib.sha256(settings_json.encode()).hexdigest()
    if key not in _WORKER:
        settings = Settings.model_validate_json(settings_json)
        shared = next((rt for _, rt, _ in _WORKER.values() if rt.key == resource_key(settings)), None)
        _WORKER.clear()  # a new run in the same process: drop the old model unless it is the same
        torch.set_num_threads(max(1, int(settings.simulation.cpus_per_worker)))
        runtime = shared or DeviceRuntime(settings)
        _WORKER[key] = (settings, runtime, HeterogeneityModel.from_settings(settings.heterogeneity))
    return _WORKER[key]


def device_round(settings_json: str, device_id: int, now: float, store_dir: str, simulated_timing: bool,
                 downlink: Downlink | None = None) -> DeviceRoundResult:
    """Run one device round in this process. Simulated devices keep their state only if they finish
    inside their availability window; real devices always keep it."""
    from fedasls.device_round import keep_always, run_device_round
    from fedasls.simulated_timing import SimulatedTiming
    from fedasls.store import DeviceStore
    from fedasls.timing import record, stage

    with record() as timer:  # the reply carries per-stage seconds (numbers only), see fedasls.timing
        with stage("worker_setup"):  # the base model loads on a worker's first call only
            settings, runtime, hetero = worker_resources(settings_json)
        keep = SimulatedTiming(hetero).keep_if_online(device_id, now) if simulated_timing else keep_always
        result = run_device_round(device_id, now, runtime, settings, DeviceStore(store_dir), hetero, keep=keep,
                                  downlink=downlink)
    result.stage_seconds = timer.metrics()  # the round's stages and the worker setup
    return result


def device_round_metrics(settings_json: str, device_id: int, now: float, store_dir: str,
                         simulated_timing: bool) -> dict[str, float | int]:
    """Run one device round in this process; its reply metrics."""
    return device_round(settings_json, device_id, now, store_dir, simulated_timing).metrics()


def downlink_of(msg: Message, settings: Settings) -> Downlink | None:
    """The global adapter this message carries (a global-adapter round), or None (local)."""
    if GLOBAL_ADAPTER_KEY not in msg.content:
        return None
    from fedasls.federated.client import Downlink

    f = settings.federated
    return Downlink(f.strategy, f.ffa, settings.adaptation.lora_rank, f.seed, f.clip_norm,
                    msg.content[GLOBAL_ADAPTER_KEY].to_torch_state_dict())


def device_id_of(msg: Message, context: Context) -> int:
    config = msg.content["config"]
    if "device-id" in config:
        return int(config["device-id"])
    return node_device_id(context)


def node_device_id(context: Context) -> int:
    """The device this SuperNode is (Deployment Engine: `--node-config "partition-id=N"`)."""
    if "partition-id" not in context.node_config:
        raise KeyError("this SuperNode has no partition-id: start it with --node-config \"partition-id=N\"")
    return int(context.node_config["partition-id"])


def _store_dir(msg: Message, context: Context) -> str:
    return str(context.node_config.get("store-dir", msg.content["config"]["store"]))


app = ClientApp(mods=[privacy_guard])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which device this node is: the node's partition-id, as a number (node_config stays here)."""
    return build_reply(msg, {"device_id": node_device_id(context)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Catch up the stream to the (virtual) time, adapt if the trigger says so, evaluate, save."""
    config = msg.content["config"]
    settings_json, now, store = str(config["settings"]), float(config["now"]), _store_dir(msg, context)
    simulated = bool(config.get("simulated-timing", False))
    if "device-ids" in config:  # a worker slot running several devices side by side
        from clients.device_pool import run_devices

        rows = run_devices(device_round_metrics, settings_json, [int(d) for d in config["device-ids"]], now,
                           store, simulated, int(config.get("parallel", 1)))
        return build_batch_reply(msg, rows)
    downlink = downlink_of(msg, worker_resources(settings_json)[0])
    result = device_round(settings_json, device_id_of(msg, context), now, store, simulated, downlink)
    return build_reply(msg, result.metrics(), result.contribution.update if result.contribution else None)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized vs base metrics on the device's held-out interactions; state is not changed."""
    from fedasls.adaptation import adapter_state
    from fedasls.device_round import load_device
    from fedasls.federated.client import global_model_adapter
    from fedasls.store import DeviceStore

    config = msg.content["config"]
    settings, runtime, hetero = worker_resources(str(config["settings"]))
    device_id = device_id_of(msg, context)
    device = load_device(device_id, runtime, settings, DeviceStore(_store_dir(msg, context)), hetero)
    personal, base = device.evaluate()
    metrics = {"device_id": device_id, "rouge1": personal.rouge1, "rougeL": personal.rougeL,
               "perplexity": personal.perplexity, "base_rouge1": base.rouge1, "base_rougeL": base.rougeL,
               "base_perplexity": base.perplexity}
    downlink = downlink_of(msg, settings)
    if downlink is not None:  # the global adapter alone on this device (state not saved)
        device.adapter = global_model_adapter(adapter_state(runtime.activate(device.lora_rank, settings.adaptation)), downlink)
        shared, _ = device.evaluate()
        metrics |= {"global_rouge1": shared.rouge1, "global_rougeL": shared.rougeL, "global_perplexity": shared.perplexity}
    return build_reply(msg, metrics)
