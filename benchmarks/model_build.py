"""Build the embedded default base model and report its cost and quality.

Prints wall time, parameter count, held-out loss before/after pretraining and a few
greedy sample answers. Example:

    python benchmarks/model_build.py --threads 2
    python benchmarks/model_build.py --set pretrain_steps=300 --set hidden_size=96
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedasls.config import ModelSettings
from fedasls.lm.model import BUILD_INFO, build_default_model, default_model_dir, generate, load_model
from fedasls.lm.prompts import PromptFormat

QUESTIONS = [
    "How do I keep my sourdough starter alive?",
    "What is a good beginner workout plan?",
    "How can I save money on groceries?",
    "Why are the leaves on my tomato plants turning yellow?",
    "thanks a lot",
]


def _parse_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set pretrain_steps=300")
        key, raw = item.split("=", 1)
        out[key.strip()] = json.loads(raw) if raw.strip() and raw.strip()[0] in "-0123456789.tf[" else raw
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="build into this cache root (default: a fresh temporary folder, removed afterwards)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ModelSettings field, e.g. --set pretrain_steps=300 (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fedasls-model-") as tmp:
        root = args.cache_dir or Path(tmp)
        settings = ModelSettings(**{**_parse_overrides(args.overrides), "cache_dir": str(root)})
        target = default_model_dir(settings)
        start = time.perf_counter()
        build_default_model(settings, target)
        wall = time.perf_counter() - start
        info = json.loads((target / BUILD_INFO).read_text())
        model, tokenizer = load_model(target)
        t0 = time.perf_counter()
        answers = generate(model, PromptFormat(tokenizer), QUESTIONS, max_new_tokens=args.max_new_tokens)
        gen_s = time.perf_counter() - t0

    print(f"settings:        {json.dumps(info['settings'])}")
    print(f"threads:         {args.threads}")
    print(f"build wall time: {wall:.1f} s")
    print(f"parameters:      {info['num_parameters']:,} (vocab {info['vocab_size']}, {info['train_blocks']} blocks "
          f"of {info['block_tokens']} tokens)")
    print(f"held-out loss:   {info['loss_start']:.3f} -> {info['loss_end']:.3f} "
          f"(train {info['train_loss_first']} -> {info['train_loss_last']})")
    print(f"generation:      {len(QUESTIONS)} prompts in {gen_s:.2f} s")
    for q, a in zip(QUESTIONS, answers):
        print(f"  Q: {q}\n  A: {a}")


if __name__ == "__main__":
    main()
