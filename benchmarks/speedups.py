"""Before/after of each device-round speed-up, paired in one process (robust on a shared machine).

Each pair runs interleaved `--repeats` times on the same inputs (devices 0..N-1 at day 6 of the
quickstart scenario); the figure is the minimum CPU seconds of each side (load inflates CPU time
too, the minimum least), with the load average next to it and whether the outputs are identical.

  train     full-logits loss vs vocabulary head on answer tokens only (fedasls.pipeline.training.ANSWER_ONLY_HEAD)
  lora      peft's LoRA backward vs rank-r products in MKL's fast orientation (fedasls.lm.fast_lora)
  adamw     AdamW's loop over the LoRA tensors vs torch's fused AdamW kernel (fedasls.pipeline.training.FUSED_ADAMW)
  score     held-out evaluation of a trained adapter: peft's unmerged LoRA vs the adapter merged into the
            base weights, restored exactly after (fedasls.lm.merged_adapter)
  generate  feedback answers in batches of 16 vs batches sized for the model (generation_batch_size)
  embed     full model with output_hidden_states vs decoder only (fedasls.lm.model.EMBED_WITHOUT_HEAD)
  evaluate  the cost a round without adaptation no longer pays (its saved evaluation is reused)

Measured, reported for the record:
  batch     training CPU at batch size 8 / 16 / 32 (same epochs; not applied)
  padding   share of training tokens that are padding, shuffled vs length-bucketed batches (applied:
            fedasls.pipeline.training.LengthBatches)

    python benchmarks/speedups.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import BASELINES, REPO, load_avg, machine, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "fedasls" / "scenarios" / "quickstart.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--devices", type=int, default=3, help="devices 0..N-1 (default 3)")
    p.add_argument("--day", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speedups.json"))
    p.add_argument("--save-baseline", metavar="NAME", help="also write benchmarks/baselines/speedups-NAME.json")
    return p.parse_args(argv)


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    c = time.process_time()
    out = fn()
    return time.process_time() - c, out


def paired(before: Callable[[], Any], after: Callable[[], Any], repeats: int,
           compare: Callable[[Any, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Interleaved runs; min CPU seconds of each side and whether their outputs are equal.

    `compare(before_output, after_output)` adds figures on how the outputs differ (e.g. `max_abs_diff`).
    The last run is an "after" one: its effects (e.g. a trained adapter) are what the next step sees.
    """
    times: dict[str, list[float]] = {"before": [], "after": []}
    outs: dict[str, Any] = {}
    for _ in range(repeats):
        for side, fn in (("before", before), ("after", after)):
            seconds, outs[side] = _cpu(fn)
            times[side].append(seconds)
    b, a = min(times["before"]), min(times["after"])
    return {"before_cpu_s": b, "after_cpu_s": a, "speedup": b / a if a else float("nan"),
            "identical": _same(outs["before"], outs["after"]), "load": load_avg(),
            **(compare(outs["before"], outs["after"]) if compare else {})}


def max_abs_diff(x: Any, y: Any) -> dict[str, float]:
    """Largest element-wise difference of two arrays of the same shape."""
    import numpy as np

    return {"max_abs_diff": float(np.abs(np.asarray(x) - np.asarray(y)).max())}


def _scores_differ(unmerged: list[tuple[float, float]], merged: list[tuple[float, float]]) -> dict[str, Any]:
    """Whether the ROUGE-1 scores are identical, and the largest perplexity difference."""
    return {"rouge1_identical": [r for r, _ in unmerged] == [r for r, _ in merged],
            "max_abs_diff": max(abs(a - b) for (_, a), (_, b) in zip(unmerged, merged))}


def _same(x: Any, y: Any) -> bool:
    import numpy as np

    if isinstance(x, np.ndarray):
        return bool(np.array_equal(x, y))
    return x == y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    import fedasls.lm.lora as lora
    import fedasls.pipeline.training as adaptation
    import fedasls.pipeline.evaluation as evaluation
    import fedasls.lm.model as model_lib
    from fedasls.config import load_settings
    from fedasls.device.device import Device
    from fedasls.interaction import STREAM_EPOCH
    from fedasls.lm.model import ensure_model, generate
    from fedasls.device.worker import DeviceRuntime

    args = parse_args(argv)
    torch.set_num_threads(1)
    settings = load_settings(args.config, args.overrides)
    settings = settings.model_copy(update={"model": settings.model.at_path(ensure_model(settings.model))})
    runtime = DeviceRuntime(settings)
    a = settings.adaptation
    devices = []
    for d in range(args.devices):
        device = Device(d, runtime, settings)
        device.catch_up(until=STREAM_EPOCH + args.day * 86400.0)
        devices.append(device)
    examples = [[adaptation.TrainingExample(it.question, it.preferred) for it in dev.selector.interactions()]
                for dev in devices]
    prompts = [it.question for dev in devices for it in dev.selector.interactions()]
    texts = [it for d in range(args.devices) for it in runtime.population.stream(d)]
    model = runtime.activate(a.lora_rank, a)

    def train(answer_only: bool, batch_size: int | None = None, fast_lora: bool = True,
              fused_adamw: bool = True) -> Callable[[], Any]:
        def run() -> Any:
            adaptation.ANSWER_ONLY_HEAD, adaptation.FAST_LORA_BACKWARD = answer_only, fast_lora
            adaptation.FUSED_ADAMW = fused_adamw
            weights = []
            try:
                for d, ex in enumerate(examples):
                    lora.reset_adapter(model, seed=d)
                    s = a if batch_size is None else a.model_copy(update={"batch_size": batch_size})
                    adaptation.train_adapter(model, runtime.prompts, ex, s, seed=d)
                    weights += [v.numpy().ravel() for _, v in sorted(lora.adapter_state(model).items())]
            finally:
                adaptation.ANSWER_ONLY_HEAD = adaptation.FAST_LORA_BACKWARD = adaptation.FUSED_ADAMW = True
            return np.concatenate(weights)
        return run

    heldout = [runtime.population.heldout(d) for d in range(args.devices)]

    def score(merge: bool) -> Callable[[], list[tuple[float, float]]]:
        def run() -> list[tuple[float, float]]:
            evaluation.MERGE_ADAPTER = merge
            try:
                return [(r.rouge1, r.perplexity) for r in (evaluation.evaluate(model, runtime.prompts, h,
                        settings.evaluation.max_new_tokens) for h in heldout)]
            finally:
                evaluation.MERGE_ADAPTER = True
        return run

    def gen(batch_size: int | None) -> Callable[[], list[str]]:
        def run() -> list[str]:
            with runtime.base_model() as m:
                return generate(m, runtime.prompts, prompts, settings.evaluation.max_new_tokens, batch_size=batch_size)
        return run

    def embed(without_head: bool) -> Callable[[], Any]:
        def run() -> Any:
            model_lib.EMBED_WITHOUT_HEAD = without_head
            try:
                return runtime.embed_interactions(texts)
            finally:
                model_lib.EMBED_WITHOUT_HEAD = True
        return run

    results: dict[str, Any] = {}
    print(f"{len(examples)} devices, {sum(map(len, examples))} training examples, {len(prompts)} feedback prompts, "
          f"{len(texts)} texts to embed; min of {args.repeats} interleaved runs, CPU seconds", flush=True)
    results["train"] = paired(train(False), train(True), args.repeats)
    results["lora"] = paired(train(True, fast_lora=False), train(True), args.repeats, compare=max_abs_diff)
    results["adamw"] = paired(train(True, fused_adamw=False), train(True), args.repeats, compare=max_abs_diff)
    # scored: the last device's adapter, as the last (fast-path) training above left it
    results["score"] = paired(score(False), score(True), args.repeats, compare=_scores_differ)
    results["generate"] = paired(gen(16), gen(None), args.repeats)
    results["embed"] = paired(embed(False), embed(True), args.repeats, compare=max_abs_diff)
    heldout_eval = [_cpu(lambda: dev.evaluate())[0] for dev in devices for _ in range(1)]
    results["evaluate"] = {"before_cpu_s": min(heldout_eval), "after_cpu_s": 0.0, "speedup": float("inf"),
                           "identical": True, "load": load_avg(),
                           "note": "per round without adaptation (the saved evaluation is reused)"}
    batch = {bs: min(_cpu(train(True, bs))[0] for _ in range(max(1, args.repeats - 1))) for bs in (8, 16, 32)}
    results["batch_size_train_cpu_s"] = batch
    results["padding"] = padding_shares(examples, runtime.prompts, a.max_length, a.batch_size)

    print(f"{'speed-up':<10}{'before CPU s':>13}{'after CPU s':>13}{'x':>7}  identical  load")
    for name in ("train", "lora", "adamw", "score", "generate", "embed", "evaluate"):
        r = results[name]
        print(f"{name:<10}{r['before_cpu_s']:>13.3f}{r['after_cpu_s']:>13.3f}{r['speedup']:>7.2f}  "
              f"{str(r['identical']):<9}  {r['load']:.1f}" + (f"  (max |diff| {r['max_abs_diff']:.1e})" if "max_abs_diff" in r else "")
              + (f"  (ROUGE-1 identical: {r['rouge1_identical']})" if "rouge1_identical" in r else ""))
    print("training CPU s by batch size (same epochs, answer-only head): "
          + ", ".join(f"{bs}: {s:.2f}" for bs, s in batch.items()))
    p = results["padding"]
    print(f"padding in training batches: {100 * p['shuffled']:.0f}% shuffled vs {100 * p['length_sorted']:.0f}% "
          f"length-bucketed (training today) -> {100 * p['token_saving']:.0f}% fewer tokens")
    summary = {"command": " ".join(["python", "benchmarks/speedups.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "results": results}
    print(f"written: {write_json(Path(args.out), summary)}")
    if args.save_baseline:
        print(f"baseline: {write_json(BASELINES / f'speedups-{args.save_baseline}.json', summary)}")
    return summary


def padding_shares(examples: list[list[Any]], prompts: Any, max_length: int, batch_size: int) -> dict[str, float]:
    """Share of processed training tokens that are padding: seeded shuffled batches vs the
    length-bucketed batches training uses (fedasls.pipeline.training.LengthBatches)."""
    import torch

    from fedasls.pipeline.training import LengthBatches, _tensorize

    real = shuffled = ordered = 0
    for seed, ex in enumerate(examples):
        if not ex:
            continue
        lengths = _tensorize(prompts, ex, max_length).tensors[1].sum(dim=1)
        perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(lengths), batch_size):
            shuffled += int(lengths[perm[i : i + batch_size]].max()) * len(perm[i : i + batch_size])
        for batch in LengthBatches(lengths.tolist(), batch_size, torch.Generator().manual_seed(seed)):
            ordered += int(lengths[batch].max()) * len(batch)
        real += int(lengths.sum())
    return {"shuffled": 1 - real / shuffled, "length_sorted": 1 - real / ordered, "token_saving": 1 - ordered / shuffled}


if __name__ == "__main__":
    main()
