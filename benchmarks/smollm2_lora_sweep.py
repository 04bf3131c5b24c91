#!/usr/bin/env python
# Run: python benchmarks/smollm2_lora_sweep.py 1 2   (device ids)
"""Small LoRA settings sweep for SmolLM2: train on a device's annotated valuable items (+1 lexical rewrite each),
score ROUGE-1 on its held-out items. Not the device pipeline: a direct measurement of lr / epochs / rank / targets."""
import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import sys, time, torch
torch.set_num_threads(1)
from fedasls.config import Settings, AdaptationSettings
from fedasls.runtime import DeviceRuntime
from fedasls.adaptation import TrainingExample, train_adapter, reset_adapter, sequence_loss
from fedasls.evaluation import evaluate
from fedasls.synthesis import lexical_fallback

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lr5e-3 ep6 r8 all (embedded default)": dict(learning_rate=5e-3, epochs=6, lora_rank=8, target_modules=ALL),
    "lr1e-3 ep3 r8 all": dict(learning_rate=1e-3, epochs=3, lora_rank=8, target_modules=ALL),
    "lr3e-4 ep3 r8 all": dict(learning_rate=3e-4, epochs=3, lora_rank=8, target_modules=ALL),
    "lr1e-3 ep3 r8 q/v": dict(learning_rate=1e-3, epochs=3, lora_rank=8, target_modules=["q_proj", "v_proj"]),
}
devices = [int(x) for x in sys.argv[1:]] or [1, 2]
s = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"}})
rt = DeviceRuntime(s)
for d in devices:
    items = [it for it in rt.population.stream(d) if it.kind == "valuable"][:12]
    ex = [TrainingExample(it.question, it.preferred) for it in items]
    ex += [TrainingExample(r, it.preferred) for it in items for r in lexical_fallback(it.question, 1, seed=d)]
    held = rt.population.heldout(d)
    with rt.base_model() as base:
        b = evaluate(base, rt.prompts, held, 72)
    print(f"device {d}: {len(ex)} examples; base rouge1 {b.rouge1:.3f} ppl {b.perplexity:.2f}", flush=True)
    for name, cfg in CONFIGS.items():
        a = AdaptationSettings(batch_size=8, max_length=128, **cfg)
        slot = f"sweep-{name}"
        if slot not in rt.model.peft_config:
            from fedasls.adaptation import lora_config
            rt.model.add_adapter(slot, lora_config(a.lora_rank, a.lora_alpha, a.lora_dropout, a.target_modules))
        rt.model.set_adapter(slot)
        reset_adapter(rt.model, seed=d)
        t = time.process_time()
        r = train_adapter(rt.model, rt.prompts, ex, a, seed=d)
        tt = time.process_time() - t
        e = evaluate(rt.model, rt.prompts, held, 72)
        print(f"  {name}: train loss {r.losses[0]:.2f}->{r.losses[-1]:.2f} ({r.steps} steps, {tt:.0f} s CPU); "
              f"held-out rouge1 {e.rouge1:.3f} (base {b.rouge1:.3f}) ppl {e.perplexity:.2f} (base {b.perplexity:.2f})", flush=True)
