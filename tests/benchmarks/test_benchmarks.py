"""Toy-size runs of every benchmark script, so none of them can rot (real model, Flower, Ray)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import pytest

from benchmarks.measure import REPO, study_settings
from simulations import cli
from benchmarks import (
    adaptation_fleet,
    batch_devices,
    breakdown,
    example_answers,
    global_adapter,
    global_adapter_pooled,
    personalization,
    population_scale,
    selection_ablation,
    throughput,
)

TOY = ["population.stream_length=30", "population.heldout=2", "adaptation.epochs=1", "adaptation.lora_rank=4",
       "evaluation.max_new_tokens=6", 'synthesis.method="fallback"', "synthesis.rewrites=1"]


def _sets(model_dir, extra=()) -> list[str]:
    return [x for o in [f'model.path="{model_dir}"', *TOY, *extra] for x in ("--set", o)]


def test_breakdown_writes_a_stage_table_a_plot_and_training_efficiency(tiny_model_dir, tmp_path):
    summary = breakdown.main(["--no-embedded", "--model", str(tiny_model_dir), "--devices", "2", "--day", "30",
                              "--out", str(tmp_path), *_sets(tiny_model_dir)])
    (result,) = summary["results"]
    with (tmp_path / "breakdown.csv").open() as f:
        stages = {row["stage"]: float(row["cpu_s"]) for row in csv.DictReader(f)}
    assert {"load_state", "catch_up", "embed", "train", "evaluate", "save", "messaging"} <= set(stages)
    assert stages["train"] > 0 and result["device_rounds_cpu_s"] > 0
    assert abs(sum(stages.values()) - result["device_rounds_cpu_s"]) < 1e-6  # the stages add up to the rounds
    assert (tmp_path / "breakdown.png").stat().st_size > 10_000
    flops = result["training_flops"]
    assert flops["flops"] > 0 and 0 < flops["fraction_of_matmul_512"] < 2
    assert json.loads((tmp_path / "breakdown.json").read_text())["machine"]["cores"] >= 1


def test_breakdown_skips_a_missing_model_folder_with_a_message(tmp_path, capsys):
    assert breakdown._models(breakdown.parse_args(["--no-embedded", "--model", str(tmp_path / "nope")])) == []
    assert "skipping model" in capsys.readouterr().err


def test_breakdown_takes_a_preset_name_and_the_models_adaptation_defaults(tiny_model_dir):
    args = breakdown.parse_args(["--no-embedded", "--model", "smollm2-135m-instruct"])
    assert breakdown._models(args) == [("smollm2-135m-instruct", "smollm2-135m-instruct")]
    preset = breakdown.run_settings("smollm2-135m-instruct", args)
    assert preset.adaptation.target_modules == ["q_proj", "v_proj"] and preset.adaptation.epochs == 3
    assert breakdown.run_settings(None, args).adaptation.epochs == 6  # the embedded model's profile


def test_breakdown_batches_the_devices_of_one_slot_and_its_stages_add_up(tiny_model_dir, tmp_path):
    summary = breakdown.main(["--no-embedded", "--model", str(tiny_model_dir), "--devices", "2", "--day", "30",
                              "--no-flops", "--batch-devices", "--out", str(tmp_path), *_sets(tiny_model_dir)])
    (result,) = summary["results"]
    stages = {row["stage"]: row["cpu_s"] for row in result["stages"]}
    assert stages["train"] > 0 and stages["evaluate"] > 0 and len(result["per_device"]) == 2
    assert abs(sum(stages.values()) - result["device_rounds_cpu_s"]) < 1e-6
    assert all(d["cpu_s"] > 0 for d in result["per_device"])


def test_batch_devices_reports_per_device_differences_of_a_batched_run(tiny_model_dir, tmp_path):
    summary = batch_devices.main(["--devices", "2", "--days", "30", "--out", str(tmp_path), *_sets(tiny_model_dir)])
    rows = summary["per_device"]
    assert [r["device_id"] for r in rows] == [0, 1]
    assert all(r["answers"] > 0 and 0 <= r["answers_differing"] <= r["answers"] for r in rows)
    assert summary["unbatched_cpu_s"] > 0 and summary["batched_cpu_s"] > 0
    assert (tmp_path / "batch_devices.json").is_file()


def test_throughput_runs_the_three_variants_and_reports_rates_ratios_and_rouge(tiny_model_dir, tmp_path):
    summary = throughput.main(["--devices", "2", "--rounds", "2", "--start-day", "30", "--out", str(tmp_path),
                               *_sets(tiny_model_dir)])
    variants = summary["variants"]
    assert set(variants) == {"fedasls", "naive", "bare"}
    for row in variants.values():
        assert row["device_rounds"] == 4 and row["rate"] > 0 and row["cpu_s"] > 0 and len(row["rouge1"]) == 2
    assert variants["naive"]["adapted"] == 4  # trains on every call
    # the same device rounds, with and without Flower and Ray
    assert sorted(variants["fedasls"]["rouge1"]) == pytest.approx(sorted(variants["bare"]["rouge1"]))
    assert {"a/n", "a/b"} <= set(summary["ratios"])


@pytest.mark.slow
def test_population_scale_starts_a_million_device_population(tiny_model_dir, tmp_path):
    rows = population_scale.main(["--populations", "1000000", "--cohort", "2", "--rounds", "1", "--out", str(tmp_path),
                                  *_sets(tiny_model_dir, ["simulation.workers=1"])])
    (row,) = rows
    assert row["population"] == 1_000_000 and row["device_rounds"] >= 1
    assert row["peak_rss_mb"] > 0 and row["startup_s"] > 0
    assert "train" in row["where_time_goes"] or "evaluate" in row["where_time_goes"]


def test_adaptation_fleet_summarizes_each_devices_last_round(tiny_model_dir, tmp_path):
    out = tmp_path / "fleet.csv"
    devices = adaptation_fleet.main(["--jobs", "1", "--out", str(out), *_sets(tiny_model_dir, [
        "population.num_devices=6", "simulation.cohort_size=2", "simulation.overcommit=1.0", "simulation.rounds=2"])])
    assert 1 <= len(devices) <= 4 and len({d["device_id"] for d in devices}) == len(devices)
    assert all(0 <= d["rouge1"] <= 1 and 0 <= d["base_rouge1"] <= 1 for d in devices)
    with out.open() as f:
        assert len(list(csv.DictReader(f))) >= len(devices)  # one row per device round
    # --baseline: the paired difference against an earlier run's CSV (here: itself, then one device better)
    rows = adaptation_fleet.read_rows(out)
    same = adaptation_fleet.paired_difference(rows, rows)
    assert same["devices"] == len(devices) and same["uplift_difference"] == (0.0, 0.0, 0.0)
    last = max((r for r in rows if r["device_id"] == devices[0]["device_id"] and r["status_code"] == 0),
               key=lambda r: r["round"])
    better = [dict(r, rouge1=r["rouge1"] + 0.1) if r is last else r for r in rows]
    assert adaptation_fleet.paired_difference(better, rows)["uplift_difference"][0] == pytest.approx(0.1 / len(devices))
    assert same["train_cpu_s"][0] == same["train_cpu_s"][1] > 0


def test_global_adapter_compares_strategies_on_cold_start_and_trained_devices(tiny_model_dir, tmp_path):
    out = tmp_path / "global.json"
    summary = global_adapter.main(["--train", "2", "--cold", "2", "--rounds", "1", "--cohort", "2", "--adoption", "3",
                                   "--out", str(out),
                                   *_sets(tiny_model_dir, ["adaptation.gate=\"off\"", "adaptation.min_items=2",
                                                           "population.trend_share=1.0"])])
    assert summary["cold_start"]["global_minus_base"]["n"] == 2
    trained = summary["trained_devices"]
    assert trained["n"] == 2 and set(summary["per_device"]) == {"local", "global", "global+personal"}
    assert json.loads(out.read_text())["cold_start"] == summary["cold_start"]
    # pooling two runs: the cold devices (2 and 3) of each, every user following the trend
    g = summary["per_device"]["global"]
    diffs = [g["global_alone"][d] - g["base"][d] for d in (2, 3)]
    pooled = global_adapter_pooled.main([str(out), str(out)])
    assert pooled["all"] == pytest.approx(diffs * 2) and pooled["trend users"] == pooled["all"]
    assert pooled["other users"] == []
    # cold devices chose by their user's feedback: the global adapter's gain where they adopted it, else 0
    adopted = g["adopted"]
    assert set(adopted) == {2, 3} and all(0 < a["n"] <= 3 for a in adopted.values())
    chosen = [g["global_alone"][d] - g["base"][d] if adopted[d]["adopt"] else 0.0 for d in (2, 3)]
    assert pooled["chosen by feedback - base, all"] == pytest.approx(chosen * 2)
    assert summary["cold_start"]["adoption_minus_base"]["mean"] == pytest.approx(sum(chosen) / 2)
    # and the trained devices (0 and 1) of each run, paired by device
    gp, loc = summary["per_device"]["global+personal"], summary["per_device"]["local"]
    assert pooled["global+personal - local"] == pytest.approx([gp["personal"][d] - loc["personal"][d] for d in (0, 1)] * 2)
    assert pooled["global+personal - global alone"] == pytest.approx(
        [gp["personal"][d] - g["global_alone"][d] for d in (0, 1)] * 2)


def test_selection_ablation_runs_each_policy_and_the_rewrites_sweep(tiny_model_dir, tmp_path):
    out = tmp_path / "ablation.csv"
    rows = selection_ablation.main(["--devices", "1", "--policies", "eoe", "fifo", "--rewrites", "0", "1", "--jobs", "1",
                                    "--out", str(out), *_sets(tiny_model_dir)])
    assert [r["variant"] for r in rows] == ["policy=eoe", "policy=fifo", "rewrites=0", "rewrites=1"]
    assert all(0 <= r["rouge1"] <= 1 and r["examples"] >= 1 for r in rows)
    assert rows[2]["synthesized"] == 0 and rows[3]["synthesized"] >= 1  # the sweep's k is applied
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_personalization_runs_on_any_model_folder(tiny_model_dir, tmp_path):
    """Its real subject is the SmolLM2 preset; on the tiny model it checks the script itself."""
    out = tmp_path / "personal.csv"
    toy = [x for o in TOY + ["population.stream_length=40"] for x in ("--set", o)]
    code = personalization.main(["--model", str(tiny_model_dir), "--devices", "2", "--max-adaptations", "1",
                                         "--out", str(out), *toy])
    assert code == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["device"] for r in rows] == ["0", "1"]
    assert all(r["status"] in ("accepted", "rejected", "waiting") and 0 <= float(r["rouge1"]) <= 1 for r in rows)


BENCHMARKS = ("adaptation_fleet", "batch_devices", "breakdown", "example_answers", "global_adapter", "global_adapter_pooled",
              "personalization", "population_scale", "selection_ablation", "throughput")
OWN_SETTINGS = ("global_adapter_pooled", "example_answers")  # they read result files, whose settings they use


def test_every_benchmark_runs_as_a_module_and_explains_itself():
    kept = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "measure", "naive_flower"))
    assert kept == sorted(BENCHMARKS)  # the scripts users run; helpers are measure.py and naive_flower.py
    for name in BENCHMARKS:
        out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (name, out.stderr[-2000:])
        assert name in OWN_SETTINGS or "--set SECTION.KEY=VALUE" in out.stdout, name


def test_a_study_is_the_base_scenario_plus_each_variants_overrides(tiny_model_dir):
    study = selection_ablation.variants(["full", "eoe"], [0, 2], default_rewrites=2)
    assert study == {"policy=full": ['selection.policy="full"'], "policy=eoe": ['selection.policy="eoe"'],
                     "rewrites=0": ['selection.policy="full"', "synthesis.rewrites=0"]}  # rewrites=2 is policy=full
    args = selection_ablation.parse_args([*_sets(tiny_model_dir), "--set", "synthesis.rewrites=2"])
    variants = study_settings(args, study, selection_ablation.ONCE_AT_THE_END)
    eoe, zero = variants["policy=eoe"], variants["rewrites=0"]
    assert (eoe.selection.policy, eoe.synthesis.rewrites) == ("eoe", 2)  # the user's --set, then the variant's
    assert (zero.selection.policy, zero.synthesis.rewrites) == ("full", 0)
    assert not eoe.adaptation.use_profile_trigger and not zero.adaptation.use_profile_trigger
    assert eoe.model.path == str(tiny_model_dir) and eoe.population == zero.population
    # the user's --set wins over the benchmark's own overrides
    again = selection_ablation.parse_args([*_sets(tiny_model_dir), "--set", "adaptation.use_profile_trigger=true"])
    assert study_settings(again, study, selection_ablation.ONCE_AT_THE_END)["rewrites=0"].adaptation.use_profile_trigger


CHILD = "import sys, time\nwhile time.process_time() < {cpu}: pass\nprint('burned', flush=True)\nsys.stdin.readline()\n"
PARENT = f"""import subprocess, sys
def child(cpu):
    return subprocess.Popen([sys.executable, '-c', {CHILD!r}.format(cpu=cpu)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
print('ready', flush=True); sys.stdin.readline()
seen = child(0.3); seen.stdout.readline()         # burned; alive until told
print('seen alive', flush=True); sys.stdin.readline()
seen.communicate('\\n')                          # reaped: its time lands in our children times too
unseen = child(0.2); unseen.communicate('\\n')   # born and reaped between two samples
print('reaped', flush=True); sys.stdin.readline()  # idle until the last sample
"""


def test_tree_cpu_counts_each_process_once(tmp_path):
    """A child sampled while alive and then reaped shows up twice in the OS's figures (its own times,
    then its parent's children times); a child born and reaped between two samples only in the
    second. The tree total must count each exactly once: the parent's own and reaped CPU seconds.
    Samples are taken at fixed points while every process of the tree is blocked, so the verdict
    does not depend on the machine's load (the margin is two clock ticks; counting the sampled child
    twice would add its 0.3 s)."""
    import psutil

    from benchmarks.measure import TreeCPU

    def total(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)

    def step(expect: str) -> None:
        assert proc.stdout.readline().strip() == expect
        time.sleep(0.2)  # the parent (and its live child) block on stdin

    try:
        step("ready")
        start = total(parent)
        tree = TreeCPU(proc.pid, period=3600.0)  # no sampling thread in the way: samples at the points below
        with tree:
            proc.stdin.write("go\n"), proc.stdin.flush()
            step("seen alive")
            tree.sample()
            sampled_child = tree.seconds
            proc.stdin.write("next\n"), proc.stdin.flush()
            step("reaped")
            tree.sample()
            truth = total(parent) - start
            assert tree.seconds == pytest.approx(truth, abs=0.021), (tree.seconds, truth)
    finally:
        proc.stdin.write("end\n"), proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert sampled_child >= 0.25 and truth >= 0.45  # both children's work is in the truth, each once


def test_device_flag_becomes_settings_and_a_missing_gpu_is_said_not_hidden():
    import subprocess
    import sys

    import torch

    from benchmarks.measure import device_overrides

    assert device_overrides(None) == [] and device_overrides("cpu") == ['model.device="cpu"']
    assert device_overrides("auto", workers=2) == ['model.device="auto"', "simulation.gpus_per_worker=0.5"]
    if torch.cuda.is_available():
        assert device_overrides("cuda", workers=4)[1] == "simulation.gpus_per_worker=0.25"
    else:
        done = subprocess.run([sys.executable, "-m", "benchmarks.breakdown", "--device", "cuda", "--devices", "1"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "sees no CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_example_answers_regenerates_a_runs_stored_base_examples_identically_on_one_machine(tiny_model_dir, tmp_path,
                                                                                          capsys):
    out = tmp_path / "study"
    argv = ["study", "selection", "--devices", "2", "--budgets", "4096", "--variants", "full@4096", "--out", str(out),
            *_sets(tiny_model_dir, ['adaptation.gate="off"'])]
    assert cli.main(argv) == 0, capsys.readouterr().err
    checked = example_answers.main([str(out), "--out", str(tmp_path / "check")])
    assert len(checked) == 2 and all(r["identical"] for r in checked)  # the gate is off: both kept an adapter
    assert "2 of 2 stored base-model examples generated identically" in capsys.readouterr().out
    # a stored answer that this machine would not give is found, with where it parts
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows[0]["example_base"]) > 3 and rows[0]["example_base"][2] != "#"
    rows[0]["example_base"] = rows[0]["example_base"][:2] + "#" + rows[0]["example_base"][3:]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    checked = example_answers.main([str(out), "--out", str(tmp_path / "check")])
    assert [r["identical"] for r in checked] == [False, True] and checked[0]["parts_at_char"] == 2
    with pytest.raises(SystemExit, match="study.json is missing"):
        example_answers.main([str(tmp_path / "nothing")])
