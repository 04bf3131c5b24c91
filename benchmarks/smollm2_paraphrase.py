#!/usr/bin/env python
# Run: python benchmarks/smollm2_paraphrase.py
"""SmolLM2 paraphrasing with the chat template: share of rewrites passing the ROUGE filter alone and
filter_llm_rewrites (ROUGE + still a question), on 12 default-population questions; and the probe verdict."""
import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import time, torch
torch.set_num_threads(1)
from fedasls.config import PopulationSettings, SynthesisSettings
from fedasls.population import population_from_settings
from fedasls.model import load_model
from fedasls.presets import ensure_preset
from fedasls.prompts import PromptFormat
from fedasls.synthesis import llm_rewrites, rouge_filter, filter_llm_rewrites, probe_paraphrase
m, tok = load_model(ensure_preset("smollm2-135m-instruct"))
fmt = PromptFormat(tok)
t = time.process_time()
probe = probe_paraphrase(m, fmt, SynthesisSettings())
print(f"probe: {probe.kept}/{probe.generated} pass = {probe.pass_rate:.2f} -> can_paraphrase={probe.can_paraphrase} ({time.process_time()-t:.0f} s CPU)", flush=True)
pop = population_from_settings(PopulationSettings())
qs = [q for d in range(4) for q in [it.question for it in pop.stream(d) if it.kind == "valuable"][:3]]
gen = rouge_only = both = 0
for i, q in enumerate(qs):
    raw = llm_rewrites(m, fmt, q, 3, seed=i)
    gen += len(raw); rouge_only += len(rouge_filter(q, raw, 0.3, 0.95)); kept = filter_llm_rewrites(q, raw, 0.3, 0.95); both += len(kept)
    print(repr(q), "->", kept, flush=True)
print(f"population questions: {gen} rewrites, ROUGE filter alone {rouge_only/gen:.2f}, ROUGE + question form {both/gen:.2f}")
