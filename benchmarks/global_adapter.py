"""Does a global adapter help? local vs global (FedAvg) vs global+personal (FedSA-LoRA), plain loop.

Devices are run as in the fleet (run_device_round, heterogeneous LoRA ranks from the tiers, the
fleet's own round strategy: configure_train / aggregate_train of fedasls.federated.strategies),
without Flower, for speed. Measured:
- cold start: devices that never trained, base model vs the final global adapter alone
  (global_model_adapter at each device's rank), held-out ROUGE-1, paired difference per device;
- cold-start adoption (--adoption N): each cold device catches up its stream to the last round,
  shows its user the base model's and the global adapter's answers to its N most recent buffered
  questions side by side, and adopts the global adapter only if the user's implicit reactions
  favour it (fedasls.device.adoption); its model is then the global adapter, else the base;
- personalization: on the devices that trained, each strategy's personal model vs local and vs
  the global adapter alone.
Prints means with bootstrap 95% CIs over devices and writes JSON.

    python benchmarks/global_adapter.py --train 12 --cold 12 --rounds 4 --cohort 6
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedasls.lm.lora import adapter_state
from fedasls.config import load_settings
from fedasls.device.round import load_device, run_device_round
from fedasls.device.global_round import cold_start_choice
from fedasls.device.released import global_alone
from fedasls.federated.strategies import make_global_strategy
from fedasls.federated.strategy import Contribution
from fedasls.lm.adapter_layout import adapter_layout
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.interaction import STREAM_EPOCH
from fedasls.device.worker import DeviceRuntime
from fedasls.stats import mean_ci
from fedasls.device.store import DeviceStore

STRATEGIES = ("local", "global", "global+personal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=12, help="devices 0..N-1 take part in rounds")
    p.add_argument("--cold", type=int, default=12, help="the next M devices never train (cold start)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cohort", type=int, default=6)
    p.add_argument("--config", default="fedasls/scenarios/quickstart.toml", help="settings TOML (default: the quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--adoption", type=int, default=0, metavar="N",
                   help="cold devices decide on the global adapter by their user's reactions to both models' answers "
                   "to their N most recent buffered questions (0 = off)")
    p.add_argument("--out", default="benchmarks/results/global_adapter.json")
    return p.parse_args(argv)


def run(strategy: str, args: argparse.Namespace, root: Path) -> dict:
    settings = load_settings(args.config, args.overrides + [f"federated.strategy='{strategy}'"])
    torch.set_num_threads(1)
    runtime = DeviceRuntime(settings)
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    store = DeviceStore(root / strategy.replace("+", "_"))
    sim = settings.simulation
    rounds = None if strategy == "local" else make_global_strategy(settings.federated, adapter_layout(settings),
                                                                   settings.adaptation.lora_rank)
    rng = np.random.default_rng(0)
    trained: set[int] = set()
    norms: list[float] = []
    t0 = time.process_time()
    for r in range(args.rounds):
        now = sim.start_time_s + r * sim.round_interval_s
        cohort = sorted(rng.choice(args.train, size=min(args.cohort, args.train), replace=False).tolist())
        downlink = None if rounds is None else rounds.configure_train(r + 1, cohort)
        contributions = []
        for d in cohort:
            result = run_device_round(d, now, runtime, settings, store, hetero, downlink=downlink)
            trained.add(d)
            if result.contribution is not None:
                contributions.append(Contribution(d, result.contribution.update, result.examples, result.metrics()))
                norms.append(result.contribution.norm)
        if rounds is not None:
            rounds.aggregate_train(r + 1, contributions)
        print(f"  {strategy}: round {r + 1}/{args.rounds}, {len(contributions)} updates", flush=True)
    out: dict = {"personal": {}, "global_alone": {}, "base": {}, "adopted": {}, "cpu_s": 0.0}
    final = None if rounds is None else rounds.configure_train(args.rounds + 1, [])
    for d in sorted(trained) + list(range(args.train, args.train + args.cold)):
        device = load_device(d, runtime, settings, store, hetero)
        personal, base = device.evaluate()
        out["base"][d] = base.rouge1
        if d in trained:
            out["personal"][d] = personal.rouge1
        if final is not None:
            if args.adoption and d not in trained:
                template = adapter_state(runtime.activate(device.lora_rank, settings.adaptation))
                device.catch_up(until=STREAM_EPOCH + now)  # the stream a new device has seen by the last round
                decision, _ = cold_start_choice(device, replace(final, cold_adoption=args.adoption), template)
                out["adopted"][d] = {"adopt": decision.adopt, "global_value": decision.global_value,
                                     "base_value": decision.base_value, "n": decision.n}
            out["global_alone"][d] = global_alone(device, final).rouge1
    out["cpu_s"] = time.process_time() - t0
    out["update_norms"] = norms
    return out


def ci(values) -> dict:
    values = list(values)
    m, lo, hi = mean_ci(values)
    return {"mean": m, "low": lo, "high": hi, "n": len(values)}


def main(argv: list[str] | None = None) -> dict:
    """Run each strategy, print and write the summary; returns it."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run(s, args, Path(tmp)) for s in args.strategies}
    summary = summarize(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    for section in ("cold_start", "trained_devices"):
        print(section)
        for key, v in summary.get(section, {}).items():
            if isinstance(v, dict):
                print(f"  {key:38s} {v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] (n={v['n']})")
            elif isinstance(v, float):
                print(f"  {key:38s} {v:.3f}")
    print(f"written {out}")
    return summary


def summarize(results: dict, args: argparse.Namespace) -> dict:
    cold = range(args.train, args.train + args.cold)
    summary: dict = {
        "command": "python benchmarks/global_adapter.py " + " ".join(
            f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k not in ("overrides", "out")),
        "overrides": args.overrides,
        "cpu_seconds": {s: r["cpu_s"] for s, r in results.items()},
        "update_norm_before_clip": {s: (float(np.median(r["update_norms"])) if r["update_norms"] else None)
                                    for s, r in results.items()},
        "per_device": {s: {k: r[k] for k in ("base", "personal", "global_alone", "adopted")} for s, r in results.items()},
    }
    if "global" in results:
        g = results["global"]
        summary["cold_start"] = {
            "base_rouge1": ci(g["base"][d] for d in cold),
            "global_rouge1": ci(g["global_alone"][d] for d in cold),
            "global_minus_base": ci(g["global_alone"][d] - g["base"][d] for d in cold),
        }
        if g["adopted"]:  # the device's model: the global adapter where its user's feedback chose it, else the base
            chosen = {d: g["global_alone"][d] if g["adopted"][d]["adopt"] else g["base"][d] for d in cold}
            summary["cold_start"] |= {
                "adopted_share": sum(g["adopted"][d]["adopt"] for d in cold) / len(cold),
                "adoption_minus_base": ci(chosen[d] - g["base"][d] for d in cold),
            }
    if set(STRATEGIES) - set(results):
        return summary
    trained = sorted(set.intersection(*(set(results[s]["personal"]) for s in STRATEGIES)))
    g, gp, loc = results["global"], results["global+personal"], results["local"]
    summary |= {
        "trained_devices": {
            "n": len(trained),
            "base": ci(loc["base"][d] for d in trained),
            "local_personal": ci(loc["personal"][d] for d in trained),
            "global_alone": ci(g["global_alone"][d] for d in trained),
            "global_finetuned": ci(g["personal"][d] for d in trained),
            "global+personal": ci(gp["personal"][d] for d in trained),
            "global+personal_minus_local": ci(gp["personal"][d] - loc["personal"][d] for d in trained),
            "global+personal_minus_global_alone": ci(gp["personal"][d] - g["global_alone"][d] for d in trained),
            "global_finetuned_minus_local": ci(g["personal"][d] - loc["personal"][d] for d in trained),
        },
    }
    summary["cold_start"]["fedsa_global_A_only_minus_base"] = ci(gp["global_alone"][d] - gp["base"][d] for d in cold)
    return summary


if __name__ == "__main__":
    main()
