"""Selection ablation and synthesis sweep on the default population (Qin et al., Table/Fig. style).

A study: the base scenario (the built-in defaults, or --config) with one adaptation at the end of
each device's stream (`adaptation.use_profile_trigger=false`), and one variant per selection policy
(`selection.policy=...`) and per synthesis rewrite count (`synthesis.rewrites=...` on policy full).
For each device: observe its whole stream under each variant (same LM embeddings for all), adapt
once (sparse annotation of the buffer + synthesis + LoRA), and evaluate on its held-out future
interactions. Prints mean ROUGE-1 and perplexity per variant with bootstrap 95% CIs over devices,
the per-interaction selection cost, and writes a CSV.

    python -m benchmarks.selection_ablation --devices 30
    python -m benchmarks.selection_ablation --devices 30 --set feedback.use_implicit=false   # the same study, annotations only
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

from fedasls.pipeline.selection import POLICY_NAMES
from benchmarks.measure import Study, add_run_arguments, parser, study_settings, write_rows

ONCE_AT_THE_END = ["adaptation.use_profile_trigger=false"]  # one adaptation on the whole stream's buffer
POLICIES = POLICY_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out="results/selection_ablation.csv", config=None)
    p.add_argument("--devices", type=int, default=30, help="devices 0..N-1 of the population (default 30)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--rewrites", type=int, nargs="+", default=[0, 1, 3, 6], help="synthesis sweep (policy full)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    return p.parse_args(argv)


def variants(policies: list[str], rewrites: list[int], default_rewrites: int) -> Study:
    """The policy ablation at the scenario's rewrites, then the rewrites sweep on policy full."""
    out = {f"policy={p}": [f'selection.policy="{p}"'] for p in policies}
    out |= {f"rewrites={k}": ['selection.policy="full"', f"synthesis.rewrites={k}"]
            for k in rewrites if not (k == default_rewrites and "full" in policies)}
    return out


def run_device(job: tuple[int, list[tuple[str, str]]]) -> list[dict]:
    """Every variant on one device (in a worker process with its own model copy).

    Each variant is a Device with its own Settings on the worker's one shared DeviceRuntime; the
    stream's embeddings are computed once and reused by every variant.
    """
    device_id, plan = job
    import torch

    torch.set_num_threads(1)
    from fedasls.config import Settings
    from fedasls.device.device import Device
    from fedasls.device.stream import advance

    plan_settings = [(name, Settings.model_validate_json(text)) for name, text in plan]
    runtime = _runtime(plan_settings[0][1])
    stream = runtime.population.stream(device_id)
    embeddings = runtime.embed_interactions(stream)
    rows, base = [], None
    for name, variant in plan_settings:
        device = Device(device_id, runtime, variant)
        device.base_eval = base
        progress = advance(device, stream_embeddings=embeddings)  # the whole stream, then one adaptation
        observe_ms = progress.observe_seconds * 1000 / len(stream)
        report = progress.adaptations[0]
        personal, base = device.evaluate()
        rows.append({
            "device_id": device_id, "variant": name, "policy": variant.selection.policy,
            "rewrites": variant.synthesis.rewrites,
            "rouge1": personal.rouge1, "rougeL": personal.rougeL, "perplexity": personal.perplexity,
            "accept_rate": personal.accept_rate, "base_rouge1": base.rouge1, "base_perplexity": base.perplexity,
            "annotated": report.annotated, "synthesized": report.synthesized, "examples": report.examples,
            "valuable_share": _valuable_share(device), "observe_ms": observe_ms,
        })
    return rows


_RUNTIME = None


def _runtime(settings):
    """The worker's one DeviceRuntime (model, tokenizer, population, lexicons), shared by all variants."""
    global _RUNTIME
    if _RUNTIME is None:
        from fedasls.device.worker import DeviceRuntime

        _RUNTIME = DeviceRuntime(settings)
    return _RUNTIME


def _valuable_share(device) -> float:
    items = device.selector.interactions()
    return sum(it.kind == "valuable" for it in items) / len(items) if items else 0.0


def selection_cost_ms(settings, n: int = 400) -> float:
    """Median cost of scoring + offering one interaction (no LM forward), 16 KB buffer, 128-d embeddings."""
    import numpy as np

    from fedasls.data.lexicon import default_lexicons
    from fedasls.data.population import SyntheticPopulation
    from fedasls.pipeline.profile import UserProfile
    from fedasls.pipeline.selection import Selector

    lex = default_lexicons(settings.population.seed)
    profile = UserProfile(lex.domains)
    selector = Selector.from_settings(settings.selection, lex, 0, profile)
    stream = [it for i in range(4) for it in SyntheticPopulation(4).stream(i)][:n]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(stream), settings.model.hidden_size)).astype(np.float32)
    times = []
    for it, e in zip(stream, emb):
        t0 = time.perf_counter()
        selector.observe(it, e)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; returns one row per (device, variant), as written to the CSV."""
    args = parse_args(argv)
    from fedasls.stats import mean_ci

    base = study_settings(args, {"base": []}, ONCE_AT_THE_END)["base"]
    study = variants(args.policies, args.rewrites, base.synthesis.rewrites)
    settings = study_settings(args, study, ONCE_AT_THE_END)
    plan = [(name, variant.model_dump_json()) for name, variant in settings.items()]
    t0 = time.perf_counter()
    jobs = [(d, plan) for d in range(args.devices)]
    rows: list[dict] = []
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for device_rows in tqdm(pool.map(run_device, jobs), total=len(jobs), desc="devices", unit="dev"):
            rows += device_rows
    out = write_rows(args.out, rows)

    print(f"\n{args.devices} devices, {len(plan)} variants, {time.perf_counter() - t0:.0f} s wall, "
          f"{os.cpu_count()} cores")
    base_rows = [r for r in rows if r["variant"] == plan[0][0]]
    print(f"{'variant':<18}{'ROUGE-1 mean [95% CI]':<30}{'perplexity mean [95% CI]':<32}{'valuable':>9}{'examples':>9}")
    summary = [("base model", [r["base_rouge1"] for r in base_rows], [r["base_perplexity"] for r in base_rows], None, None)]
    for name, _ in plan:
        vr = [r for r in rows if r["variant"] == name]
        summary.append((name, [r["rouge1"] for r in vr], [r["perplexity"] for r in vr],
                        sum(r["valuable_share"] for r in vr) / len(vr), sum(r["examples"] for r in vr) / len(vr)))
    for name, r1, ppl, valuable, examples in summary:
        m, lo, hi = mean_ci(r1)
        pm, plo, phi = mean_ci(ppl)
        extra = f"{valuable:>9.2f}{examples:>9.1f}" if valuable is not None else ""
        print(f"{name:<18}{m:.4f} [{lo:.4f}, {hi:.4f}]    {pm:8.2f} [{plo:.2f}, {phi:.2f}]      {extra}")
    print(f"\nselection cost per interaction (no LM forward): {selection_cost_ms(base):.3f} ms median "
          f"(target <= 2 ms); in-run observe incl. tagging: "
          f"{sum(r['observe_ms'] for r in rows) / len(rows):.3f} ms mean")
    print(f"CSV: {out}")
    return rows


if __name__ == "__main__":
    main()
