"""What a user would write without fedasls: a Flower app in the style of Flower's LLM fine-tuning
examples (flowertune-llm), used as the "naive" baseline of benchmarks/throughput.py.

Each train call loads the base model from disk, wraps it with a fresh LoRA adapter, fine-tunes on
ALL of the device's interactions so far (question -> preferred answer, i.e. fully labelled data)
and evaluates on its held-out interactions; nothing is kept between calls. The training loop,
LoRA settings and metric are fedasls's own (train_adapter, evaluate), so only the pipeline differs.
The ServerApp sends every device of a round to the worker slots (device id in the message).
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedasls.pipeline.training import TrainingExample, train_adapter
from fedasls.lm.lora import attach_lora
from fedasls.config import Settings
from fedasls.pipeline.evaluation import evaluate
from fedasls.interaction import STREAM_EPOCH
from fedasls.lm.model import load_model
from fedasls.data.population import Population
from fedasls.data.sources import population_from_settings
from fedasls.lm.prompts import PromptFormat

client_app = ClientApp()


@lru_cache(maxsize=1)
def _population(settings_json: str) -> Population:
    """The device data (a user's dataset partitions are loaded once per process, as flwr-datasets caches)."""
    return population_from_settings(Settings.model_validate_json(settings_json).population)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cpu0 = time.process_time()
    config = msg.content["config"]
    settings = Settings.model_validate_json(str(config["settings"]))
    torch.set_num_threads(max(1, int(settings.simulation.cpus_per_worker)))
    device_id, now = int(config["device-id"]), float(config["now"])
    population = _population(str(config["settings"]))
    model, tokenizer = load_model(settings.model.path)  # every call, as the examples do
    prompts = PromptFormat(tokenizer)
    a = settings.adaptation
    seed = settings.population.seed * 1_000_003 + device_id
    torch.manual_seed(seed)  # peft draws the LoRA init from torch's global RNG: seed it, or runs differ
    model = attach_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout, "default", a.target_modules)
    data = [it for it in population.stream(device_id) if it.timestamp <= STREAM_EPOCH + now]
    examples = [TrainingExample(it.question, it.preferred) for it in data]
    steps = train_adapter(model, prompts, examples, a, seed=seed).steps if examples else 0
    result = evaluate(model, prompts, population.heldout(device_id), settings.evaluation.max_new_tokens)
    metrics = {"device_id": device_id, "examples": len(examples), "steps": steps,
               "rouge1": result.rouge1, "rougeL": result.rougeL, "perplexity": result.perplexity,
               "work_cpu_s": time.process_time() - cpu0}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_server_app(settings: Settings, devices: list[int], rounds_out: list[dict]) -> ServerApp:
    """Every round, every device once, dispatched to the connected worker slots; round rows appended
    to `rounds_out` (wall seconds and each device's metrics)."""
    app = ServerApp()
    sim = settings.simulation

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        slots: list[int] = []
        while len(slots) < min(len(devices), 1):
            slots = sorted(grid.get_node_ids())
            time.sleep(0.2)
        time.sleep(1.0)
        slots = sorted(grid.get_node_ids())
        settings_json = settings.model_dump_json()
        for r in range(sim.rounds):
            t0 = time.perf_counter()
            now = sim.start_time_s + r * sim.round_interval_s
            replies: list[dict] = []
            for i in range(0, len(devices), len(slots)):
                batch = devices[i : i + len(slots)]
                messages = [Message(RecordDict({"config": ConfigRecord({"device-id": d, "now": now, "settings": settings_json})}),
                                    dst_node_id=slot, message_type="train", group_id=str(r + 1))
                            for slot, d in zip(slots, batch)]
                for reply in grid.send_and_receive(messages):
                    if reply.has_error():
                        raise RuntimeError(f"naive client failed: {reply.error.reason}")
                    replies.append(dict(reply.content["metrics"]))
            rounds_out.append({"round": r + 1, "wall_s": time.perf_counter() - t0, "devices": replies})

    return app
