"""What a released global adapter is worth on a device: alone (cold start) and as a fine-tuning start.

Shared by benchmarks/global_adapter.py and `fedasls sweep privacy` (simulations/sweep.py):
- `load_global_adapter(run_dir)`: the last global adapter a run wrote (run_dir/global-adapter/), in
  the global order, and its round;
- `released_downlink(settings, shared)`: the Downlink a device would receive with those tensors;
- `global_alone(device, downlink)`: the device's held-out metrics with the global adapter alone at its
  rank (cold start: nothing of its own), its own adapter left as it was;
- `finetuned_from(device, downlink, until)`: the device catches its stream up to `until`, runs one
  adaptation step starting from the global adapter, and returns its held-out metrics (None when it
  had too few labelled items to train, or its gate kept the base model).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from fedasls.config import Settings
from fedasls.device.global_round import adapt_from_global, global_model_adapter
from fedasls.federated.fedavg import TensorDict
from fedasls.federated.strategies import ADAPTER_DIR
from fedasls.federated.strategy import Downlink
from fedasls.lm.lora import adapter_state
from fedasls.pipeline.evaluation import EvalResult


def load_global_adapter(run_dir: Path) -> tuple[TensorDict, int]:
    """(tensors in the global order, round) of the newest global adapter in `run_dir`; FileNotFoundError if none."""
    files = sorted((Path(run_dir) / ADAPTER_DIR).glob("round-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{Path(run_dir) / ADAPTER_DIR} holds no global adapter (round-*.safetensors): "
                                "the run released none (strategy local, or no round finished)")
    path = files[-1]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = json.loads(meta["order"]) if "order" in meta else list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    return tensors, int(path.stem.split("-")[1])


def released_downlink(settings: Settings, shared: TensorDict) -> Downlink:
    """The downlink a device of this run would receive with `shared` as the global adapter."""
    f = settings.federated
    return Downlink(strategy=f.strategy, ffa=f.ffa, max_rank=settings.adaptation.lora_rank, seed=f.seed,
                    clip_norm=f.clip_norm, shared=shared, contribute=f.contribute, cold_adoption=0,
                    proximal_mu=f.proximal_mu)


def global_alone(device, downlink: Downlink) -> EvalResult:
    """Held-out metrics of `device` (a fedasls.device.device.Device) with the global adapter alone at
    its rank; the device's own adapter and adopted model are restored afterwards."""
    template = adapter_state(device.runtime.activate(device.lora_rank, device.settings.adaptation))
    own, shared = device.adapter, device.shared_model
    device.adapter = global_model_adapter(template, downlink)
    try:
        return device.evaluate()[0]
    finally:
        device.adapter, device.shared_model = own, shared


def finetuned_from(device, downlink: Downlink, until: float) -> tuple[EvalResult | None, str]:
    """(held-out metrics after one adaptation step from the global adapter, the step's status).

    Metrics are None when the device trained nothing (status "waiting" or "empty") or its gate kept
    the base model ("rejected"); with adaptation.gate = "off" every trained device keeps its fine-tuned copy.
    """
    device.catch_up(until=until)
    if len(device.selector.buffer) == 0:
        return None, "empty"
    adapt_from_global(device, replace(downlink, cold_adoption=0))
    status = device.counters.history[-1]["status"]
    if device.adapter is None:
        return None, status
    return device.evaluate()[0], status
