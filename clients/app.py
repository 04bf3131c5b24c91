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
from fedasls.faults import contained
from fedasls.heterogeneity import HeterogeneityModel
from fedasls.runtime import DeviceRuntime
from fedasls.store import DeviceStore

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


def _store(msg: Message, context: Context, server_round: int | None = None) -> DeviceStore:
    """The device's store; opened for `server_round` it rolls back an unrecorded attempt of that round."""
    return DeviceStore(str(context.node_config.get("store-dir", msg.content["config"]["store"])), round=server_round)


def _round_of(config) -> int | None:
    return int(config["server-round"]) if "server-round" in config else None


app = ClientApp(mods=[privacy_guard])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Catch up the stream to the virtual time, adapt if the trigger says so, evaluate, save."""
    config = msg.content["config"]
    device_id, store = device_id_of(msg, context), _store(msg, context, _round_of(config))
    with contained(device_id, store):
        runtime, hetero = worker_resources(str(config["settings"]))
        result = run_device_round(device_id, float(config["now"]), runtime, store, hetero)
    return build_reply(msg, result.metrics())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized vs base metrics on the device's held-out interactions; state is not changed."""
    config = msg.content["config"]
    device_id, store = device_id_of(msg, context), _store(msg, context)
    with contained(device_id, store):
        runtime, hetero = worker_resources(str(config["settings"]))
        personal, base = load_device(device_id, runtime, store, hetero).evaluate()
    metrics = {"device_id": device_id, "rouge1": personal.rouge1, "rougeL": personal.rougeL,
               "perplexity": personal.perplexity, "base_rouge1": base.rouge1, "base_rougeL": base.rougeL,
               "base_perplexity": base.perplexity}
    return build_reply(msg, metrics)
