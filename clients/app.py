"""Flower ClientApp: each train call runs one device's round from the device store.

The device id is the message's "device-id" (simulation: SuperNodes are worker slots) or, on the
Deployment Engine, the node's own `partition-id`. The base model is loaded once per worker
process and reused; only LoRA tensors are swapped per device. Replies pass the privacy guard.
"""

from __future__ import annotations

import hashlib

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.reply import build_reply, privacy_guard
from fedasls.config import Settings
from fedasls.device_round import load_device, run_device_round
from fedasls.heterogeneity import HeterogeneityModel
from fedasls.runtime import DeviceRuntime
from fedasls.store import DeviceStore
from fedasls.timing import record, stage

_WORKER: dict[str, tuple[DeviceRuntime, HeterogeneityModel]] = {}


def worker_resources(settings_json: str) -> tuple[DeviceRuntime, HeterogeneityModel]:
    """This process's runtime for these settings, built on first use (one base model per process)."""
    key = hashlib.sha256(settings_json.encode()).hexdigest()
    if key not in _WORKER:
        _WORKER.clear()  # a new run in the same process: drop the old model
        settings = Settings.model_validate_json(settings_json)
        torch.set_num_threads(max(1, int(settings.simulation.cpus_per_worker)))
        _WORKER[key] = (DeviceRuntime(settings), HeterogeneityModel.from_settings(settings.heterogeneity))
    return _WORKER[key]


def device_id_of(msg: Message, context: Context) -> int:
    config = msg.content["config"]
    if "device-id" in config:
        return int(config["device-id"])
    return int(context.node_config["partition-id"])


def _store(msg: Message, context: Context) -> DeviceStore:
    return DeviceStore(str(context.node_config.get("store-dir", msg.content["config"]["store"])))


app = ClientApp(mods=[privacy_guard])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Catch up the stream to the virtual time, adapt if the trigger says so, evaluate, save."""
    with record() as timer:  # the reply carries per-stage seconds (numbers only), see fedasls.timing
        with stage("messaging"):
            config = msg.content["config"]
        with stage("worker_setup"):  # the base model loads on a worker's first call only
            runtime, hetero = worker_resources(str(config["settings"]))
        result = run_device_round(device_id_of(msg, context), float(config["now"]), runtime, _store(msg, context), hetero)
    return build_reply(msg, result.metrics() | timer.metrics())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized vs base metrics on the device's held-out interactions; state is not changed."""
    config = msg.content["config"]
    runtime, hetero = worker_resources(str(config["settings"]))
    device_id = device_id_of(msg, context)
    device = load_device(device_id, runtime, _store(msg, context), hetero)
    personal, base = device.evaluate()
    metrics = {"device_id": device_id, "rouge1": personal.rouge1, "rougeL": personal.rougeL,
               "perplexity": personal.perplexity, "base_rouge1": base.rouge1, "base_rougeL": base.rougeL,
               "base_perplexity": base.perplexity}
    return build_reply(msg, metrics)
