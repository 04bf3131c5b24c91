"""`fedasls study NAME`: variants that differ in what they claim, resumable per-(variant, device)
results, paired differences, reports; every study at toy size on the tiny model."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fedasls.config import ConfigError
from simulations import study as st
from simulations.cli import main
from simulations.machine import cpu_model

TOY = ["population.stream_length=24", "population.heldout=2", "adaptation.epochs=1", "adaptation.lora_rank=4",
       "evaluation.max_new_tokens=4", 'synthesis.method="fallback"', "synthesis.rewrites=1"]


def _sets(extra=()) -> list[str]:
    return [x for o in [*TOY, *extra] for x in ("--set", o)]


def _inputs(name, tiny_model_dir, **kw) -> st.StudyInputs:
    return st.StudyInputs(name=name, config=None, user_overrides=[*TOY, f'model.path="{tiny_model_dir}"'], **kw)


def _rows(out):
    return [json.loads(x) for x in (out / st.RESULTS_FILE).read_text().splitlines() if x.strip()]


# --- what each study compares ----------------------------------------------------------------------


def _changed(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two settings dumps."""
    out = set()
    for k in a.keys() | b.keys():
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _changed(x, y, f"{prefix}{k}.")
        elif x != y:
            out.add(f"{prefix}{k}")
    return out


def test_each_variant_differs_from_its_reference_in_exactly_the_settings_it_claims(tiny_model_dir):
    claims = {
        "synthesis": {f"rewrites={k}": {"synthesis.rewrites"} for k in range(1, 7)},
        "asls": {"adaptation-only": {"selection.profile_weight", "adaptation.use_profile_trigger"},
                 "profiling-only": {"adaptation.train_adapter"}, "fixed-schedule": {"adaptation.use_profile_trigger"},
                 "no-feedback": {"feedback.use_implicit"}},
        "heterogeneity": {"heterogeneous": {"heterogeneity.tier_mix"}},
    }
    for name, expected in claims.items():
        inputs = _inputs(name, tiny_model_dir)
        plan = {v: st.build_settings(inputs, o).model_dump() for v, o in inputs.variants().items()}
        assert set(plan) == set(expected) | {st.reference_of(name, next(iter(expected)))}
        for variant, keys in expected.items():
            assert _changed(plan[variant], plan[st.reference_of(name, variant)]) == keys, (name, variant)
    asls = {v: st.build_settings(_inputs("asls", tiny_model_dir), o) for v, o in st.asls_variants().items()}
    assert asls["adaptation-only"].selection.profile_weight == 0 and asls["full"].selection.profile_weight == 1
    assert not asls["profiling-only"].adaptation.train_adapter and not asls["no-feedback"].feedback.use_implicit
    assert st.build_settings(_inputs("heterogeneity", tiny_model_dir),
                             st.heterogeneity_variants()["homogeneous"]).heterogeneity.tier_mix == {"mid": 1.0}


def test_selection_is_every_policy_at_every_budget_against_full_at_the_same_budget(tiny_model_dir):
    inputs = _inputs("selection", tiny_model_dir, budgets=[4096, 8192])
    variants = inputs.variants()
    assert len(variants) == 16 and {v.split("@")[0] for v in variants} == set(st.POLICIES)
    for name, overrides in variants.items():
        policy, budget = name.split("@")
        s = st.build_settings(inputs, overrides)
        assert (s.selection.policy, s.selection.buffer_bytes) == (policy, int(budget))
        assert st.reference_of("selection", name) == f"full@{budget}"
    assert sorted(_inputs("synthesis", tiny_model_dir).variants()) == [f"rewrites={k}" for k in range(7)]


def test_user_set_applies_to_the_base_and_the_variants_still_win(tiny_model_dir):
    inputs = _inputs("synthesis", tiny_model_dir)
    inputs.user_overrides += ["synthesis.rewrites=5", "adaptation.learning_rate=0.001"]
    s = st.build_settings(inputs, st.synthesis_variants()["rewrites=2"])
    assert s.synthesis.rewrites == 2 and s.adaptation.learning_rate == 0.001
    assert not s.adaptation.use_profile_trigger and s.selection.policy == "full"  # the study's own base


def test_variants_option_keeps_the_references_and_refuses_unknown_names(tiny_model_dir):
    inputs = _inputs("selection", tiny_model_dir, budgets=[4096], only=["fifo@4096"])
    assert list(inputs.variants()) == ["full@4096", "fifo@4096"]
    with pytest.raises(ConfigError, match="not a variant of study selection"):
        _inputs("selection", tiny_model_dir, only=["fifo@1"]).variants()


def test_no_references_runs_the_named_variants_alone_and_needs_them_named(tiny_model_dir):
    inputs = _inputs("asls", tiny_model_dir, only=["fixed-schedule", "no-feedback"], no_references=True)
    assert list(inputs.variants()) == ["fixed-schedule", "no-feedback"]
    with pytest.raises(ConfigError, match="--no-references needs --variants"):
        _inputs("asls", tiny_model_dir, no_references=True).variants()


# --- statistics ------------------------------------------------------------------------------------


def test_paired_difference_is_the_mean_of_per_device_differences():
    rows = [{"variant": "a", "device_id": d, "m": v} for d, v in enumerate([0.1, 0.5, 0.2, 0.9, 0.4])]
    rows += [{"variant": "b", "device_id": d, "m": v} for d, v in enumerate([0.3, 0.4, 0.6, 0.7, float("nan")])]
    rows += [{"variant": "b", "device_id": 9, "m": 1.0}]  # no pair: left out
    mean, low, high, n = st.paired_difference(rows, "m", "b", "a")
    diffs = [0.3 - 0.1, 0.4 - 0.5, 0.6 - 0.2, 0.7 - 0.9]
    assert n == 4 and mean == pytest.approx(sum(diffs) / 4) and low <= mean <= high
    # not the difference of the unpaired means (device 9 and device 4 would count there)
    unpaired = (0.3 + 0.4 + 0.6 + 0.7 + 1.0) / 5 - (0.1 + 0.5 + 0.2 + 0.9 + 0.4) / 5
    assert not math.isclose(mean, unpaired)
    summary = st.summary_rows("asls", ["full", "no-feedback"], [
        {"variant": "full", "device_id": 0, "rouge1": 0.2}, {"variant": "full", "device_id": 1, "rouge1": 0.4},
        {"variant": "no-feedback", "device_id": 0, "rouge1": 0.1}, {"variant": "no-feedback", "device_id": 1, "rouge1": 0.1},
    ], ["rouge1"])
    assert summary[1]["diff_rouge1"] == pytest.approx(-0.2) and summary[1]["diff_rouge1_pairs"] == 2
    assert "diff_rouge1" not in summary[0]  # the reference has no difference with itself


def test_confidence_intervals_do_not_depend_on_the_order_rows_were_written_in():
    # a study's devices finish out of order (two jobs); its report and compare_studies must agree
    values = [0.31, -0.2, 0.05, 0.4, -0.12, 0.22, 0.0, 0.17, -0.3, 0.09]
    rows = [{"variant": "a", "device_id": d, "m": 0.0} for d in range(len(values))]
    rows += [{"variant": "b", "device_id": d, "m": v} for d, v in enumerate(values)]
    shuffled = rows[:len(values)] + rows[len(values):][::-1]
    assert st.paired_difference(shuffled, "m", "b", "a") == st.paired_difference(rows, "m", "b", "a")
    b_rows = rows[len(values):]
    assert st.summarize_variant(b_rows[::-1], "m") == st.summarize_variant(b_rows, "m")

# --- inputs ----------------------------------------------------------------------------------------


def test_data_maps_to_the_population_by_suffix_and_content(tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"instruction": "q", "response": "a", "user_id": "u1"}) + "\n")
    assert st.data_overrides(str(users)) == ['population.source="jsonl"', f'population.jsonl_path="{users}"',
                                             'population.partition="user"']
    plain = tmp_path / "alpaca.txt"
    plain.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    assert st.data_overrides(str(plain))[:1] == ['population.source="jsonl"'] and len(st.data_overrides(str(plain))) == 2
    posts = tmp_path / "dump" / "Posts"
    posts.parent.mkdir()
    posts.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n</posts>\n')
    assert st.data_overrides(str(posts)) == ['population.source="stackexchange"', f'population.posts_path="{posts}"']
    site = tmp_path / "dumps" / "kettles.stackexchange.com"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n</posts>\n')
    for folder in (site, site.parent):  # a dump's folder, or a folder of dumps (SITE/Posts.xml each)
        assert st.data_overrides(str(folder)) == ['population.source="stackexchange"',
                                                  f'population.posts_path="{folder}"']
    with pytest.raises(ConfigError, match="a folder without Posts.xml"):
        st.data_overrides(str(posts.parent))  # holds a file named Posts, not Posts.xml
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(ConfigError, match="neither JSONL"):
        st.data_overrides(str(other))
    with pytest.raises(ConfigError, match="no such file"):
        st.data_overrides(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("argv", [["study"], *[["study", name] for name in st.STUDIES]])
def test_every_study_has_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0 and "usage: fedasls study" in capsys.readouterr().out


def test_unknown_study_and_bad_input_exit_2(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as done:
        main(["study", "nope"])
    assert done.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x00\x01binary")
    assert main(["study", "asls", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "neither JSONL" in capsys.readouterr().err
    assert main(["study", "asls", "--model", str(tiny_model_dir), "--devices", "0", "--out", str(tmp_path)]) == 2
    assert "--devices 0" in capsys.readouterr().err


def test_a_real_jsonl_file_runs_one_device_per_user(tmp_path, tiny_model_dir, capsys):
    records = [{"instruction": f"How do I brew coffee number {i} with a {u} grinder?", "response":
                f"Grind {u} beans medium fine and pour slowly, step {i}.", "category": "food", "user_id": u}
               for u in ("ana", "bo") for i in range(6)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "study"
    code = main(["study", "synthesis", "--model", str(tiny_model_dir), "--data", str(data), "--devices", "2",
                 "--variants", "rewrites=1", "--out", str(out), *_sets()])
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert {(r["variant"], r["device_id"]) for r in rows} == {(v, d) for v in ("rewrites=0", "rewrites=1") for d in (0, 1)}
    assert all(r["interactions"] == 6 - 2 for r in rows)  # each user's last records are held out


# --- device studies end to end ---------------------------------------------------------------------


def test_asls_runs_writes_its_report_and_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "asls"
    argv = ["study", "asls", "--model", str(tiny_model_dir), "--devices", "1", "--check-every", "8", "--out", str(out),
            *_sets()]
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r["variant"]: r for r in _rows(out)}
    assert set(rows) == set(st.asls_variants())
    off = rows["profiling-only"]
    assert off["train_cpu_s"] == 0 and off["examples"] == 0 and set(off["statuses"].split()) <= {"off"}
    assert set(off["best_epochs"].split()) == {"0"}  # nothing trained
    for r in rows.values():  # one best epoch per adaptation; a trained candidate's is one of its epochs (TOY: 1)
        statuses, best = r["statuses"].split(), r["best_epochs"].split()
        assert len(best) == len(statuses)
        assert all(b == ("1" if s in ("accepted", "rejected") else "0") for s, b in zip(statuses, best))
    assert off["rouge1"] == off["base_rouge1"]  # the base model answers
    assert off["loss_reduction"] == pytest.approx(0.0, abs=1e-9)  # ... and is as surprised by the user's answers
    assert rows["adaptation-only"]["profile_weight"] == 0 and rows["full"]["profile_weight"] == 1
    assert rows["fixed-schedule"]["adaptations"] == 3  # 24 interactions checked every 8: adapt at every check
    assert rows["full"]["adaptations"] <= rows["fixed-schedule"]["adaptations"]
    assert rows["no-feedback"]["edits"] == 0 and not rows["no-feedback"]["use_implicit"]
    assert "example_question" not in off  # no adapter: no example of what one learned
    report = (out / "report.md").read_text()
    assert "fedasls study asls" in report and "Machine: cpu" in report and "| profiling-only | full | 1 |" in report
    for name in ("results.csv", "summary.csv", "study.json", "variants.png", "utility_vs_cost.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "summary.csv").open() as f:
        summary = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(summary["fixed-schedule"]["diff_adaptations"]) == pytest.approx(
        rows["fixed-schedule"]["adaptations"] - rows["full"]["adaptations"])

    # a rerun skips every finished (variant, device); a half-written last line is redone
    lines = (out / st.RESULTS_FILE).read_text().splitlines()
    (out / st.RESULTS_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    ran = []
    real = st.run_device_variant
    # a spy, not a mock: it records which (variant, device) runs again and then runs it for real (which
    # tasks a resumed study re-runs is not visible in its outputs, whose rows are the same either way)
    monkeypatch.setattr(st, "run_device_variant", lambda task: ran.append(task[1]) or real(task))
    assert main(argv) == 0
    assert ran == [json.loads(lines[-1])["variant"]]
    assert len(_rows(out)) == 5
    assert main(argv) == 0 and "another environment" not in capsys.readouterr().err  # one environment: no warning
    assert "Rows by environment" not in (out / "report.md").read_text()
    # rows from another machine or library version (a resume elsewhere): said on resume and in the report
    moved = [json.loads(x) for x in (out / st.RESULTS_FILE).read_text().splitlines()]
    assert moved[0]["environment"].startswith(cpu_model()) and "; peft " in moved[0]["environment"]
    moved[0]["environment"] = "Another CPU 9000; torch 0.1"
    (out / st.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in moved))
    assert main(argv) == 0
    assert "1 from Another CPU 9000; torch 0.1" in capsys.readouterr().err
    assert "Rows by environment (a mix): Another CPU 9000; torch 0.1: 1, " in (out / "report.md").read_text()
    # other settings in the same folder: refused, unless --overwrite
    assert main([*argv, "--set", "adaptation.learning_rate=0.001"]) == 2
    assert "made with other settings" in capsys.readouterr().err


def test_selection_and_synthesis_studies_apply_their_variants(tiny_model_dir, tmp_path):
    out = tmp_path / "selection"
    st.run_study(_inputs("selection", tiny_model_dir, devices=1, budgets=[1024, 2048], only=["fifo@1024", "fifo@2048"],
                         out=out))
    rows = _rows(out)
    assert sorted((r["policy"], r["buffer_budget_bytes"]) for r in rows) == [
        ("fifo", 1024), ("fifo", 2048), ("full", 1024), ("full", 2048)]
    assert all(r["adaptations"] == 1 for r in rows)  # one adaptation at the end of the stream
    assert any(r["statuses"] in ("accepted", "rejected") for r in rows)
    for r in rows:  # the last gated step's evidence, or none when nothing was gated
        gated = r["statuses"] in ("accepted", "rejected")
        assert (r["heldback"] >= 1 and 0 <= r["new_heldback_rouge1"] <= 1 and r["new_heldback_loss"] > 0
                and r["scale"] in (1.0, 0.75, 0.5)) if gated else r["heldback"] == 0
    assert "| fifo@1024 | full@1024 | 1 |" in (out / "report.md").read_text()

    out = tmp_path / "synthesis"
    st.run_study(_inputs("synthesis", tiny_model_dir, devices=1, only=["rewrites=3"], out=out))
    rows = {r["variant"]: r for r in _rows(out)}
    assert rows["rewrites=0"]["synthesized"] == 0 < rows["rewrites=3"]["synthesized"]
    assert rows["rewrites=3"]["examples"] > rows["rewrites=0"]["examples"]
    assert rows["rewrites=3"]["train_cpu_per_example"] > 0


def test_a_device_that_kept_an_adapter_shows_what_it_learned_on_a_held_out_question(tiny_model_dir, tmp_path):
    out = tmp_path / "kept"
    inputs = st.StudyInputs(name="selection", config=None, devices=1, budgets=[2048], only=["fifo@2048"], out=out,
                            user_overrides=[*TOY, f'model.path="{tiny_model_dir}"', 'adaptation.gate="off"'])
    st.run_study(inputs)
    rows = _rows(out)
    assert rows and all(r["accepted"] == 1 for r in rows)  # the gate off: every trained adapter is kept
    for r in rows:
        assert r["example_question"] and r["example_preferred"] and {"example_base", "example_personal"} <= set(r)
        assert max(len(r[f"example_{k}"]) for k in ("question", "preferred", "base", "personal")) <= st.EXAMPLE_CHARS
        # the length-aware endpoint: the kept adapter's loss on the user's own held-out answers against the base's
        assert r["loss_reduction"] == pytest.approx(math.log(r["base_perplexity"]) - math.log(r["perplexity"]))
        assert r["loss_reduction"] != 0
        assert r["reference_words"] > 0 and r["answer_words"] >= 0 and r["base_answer_words"] >= 0
    assert "answer loss reduction (nats)" in (out / "report.md").read_text()


def test_a_report_with_nothing_to_pair_has_no_empty_paired_table():
    inputs = st.StudyInputs(name="selection", config=None, user_overrides=[])
    rows = [{"variant": v, "device_id": 0, "rouge1": 0.2 + 0.1 * k, "base_rouge1": 0.2, "perplexity": 20.0,
             "base_perplexity": 25.0} for k, v in enumerate(("full@1024", "fifo@1024"))]
    info = {"command": "fedasls study selection", "machine_line": "cpu", "devices": 1, "base_overrides": [],
            "finished": "now"}

    def report(variants):
        mine = [st.with_derived(r) for r in rows if r["variant"] in variants]
        summary = st.summary_rows("selection", list(variants), mine, st.STUDIES["selection"].metrics)
        return st.report_markdown(inputs, variants, summary, [], info, [])

    paired = report({"full@1024": [], "fifo@1024": []})
    assert "## Paired differences" in paired and "| fifo@1024 | full@1024 | 1 |" in paired
    assert "+0.1000 [+0.1000, +0.1000]" in paired  # fifo's ROUGE-1 uplift, signed
    alone = report({"full@1024": []})  # the reference alone: nothing to pair
    assert "## Paired differences" not in alone and "| full@1024 |" in alone
    assert "Not paired here" not in paired + alone
    without_reference = report({"fifo@1024": []})  # --no-references: says where its pairing is
    assert "## Paired differences" not in without_reference
    assert "Not paired here" in without_reference and "fifo@1024 (reference full@1024)" in without_reference


def test_rows_written_before_loss_reduction_derive_it_from_their_perplexities():
    old = {"variant": "full", "device_id": 0, "perplexity": 20.0, "base_perplexity": 25.0}
    assert st.with_derived(old)["loss_reduction"] == pytest.approx(math.log(25.0 / 20.0))
    assert math.isnan(st.with_derived({**old, "perplexity": float("nan")})["loss_reduction"])
    assert st.with_derived({**old, "loss_reduction": 0.5})["loss_reduction"] == 0.5  # a recorded value wins


def test_profile_weight_survives_a_saved_device(tiny_model_dir):
    from fedasls.device.device import Device

    settings = st.build_settings(_inputs("asls", tiny_model_dir), st.asls_variants()["adaptation-only"])
    runtime = st._runtime(settings)
    device = Device(0, runtime, settings)
    assert device.selector.policy.profile_weight == 0
    again = Device.from_state(device.to_state(), runtime, settings)
    assert again.selector.policy.profile_weight == 0


# --- fleet and delegated studies -------------------------------------------------------------------


def test_privacy_delegates_to_the_sweep_with_the_study_settings(tiny_model_dir, tmp_path, monkeypatch):
    import simulations.sweep as sweep

    calls = []

    def fake(base, noises, out_dir, jobs=1, include_no_noise=True, progress=True):
        calls.append((base, noises, out_dir, jobs, include_no_noise))
        return [{"noise_multiplier": 1.0, "epsilon": 3.2, "cold_uplift": 0.01, "cold_uplift_low": 0.0,
                 "cold_uplift_high": 0.02, "finetuned_rouge1": 0.4, "finetuned_rouge1_low": 0.3,
                 "finetuned_rouge1_high": 0.5, "reports": ["epsilon 3.2 (delta 1e-5)"]}]

    # The sweep itself runs for real in tests/simulations/test_privacy_sweep.py (integration, ~2 min of a CI
    # near its 20-minute limit), whose assertions pin the row keys this report reads (noise_multiplier, epsilon,
    # cold_uplift and finetuned_rouge1 with _low/_high, reports); here only the study's wiring of its arguments
    # and its report of such rows is checked, so the sweep is replaced.
    monkeypatch.setattr(sweep, "sweep_privacy", fake)
    out = tmp_path / "privacy"
    assert main(["study", "privacy", "--model", str(tiny_model_dir), "--devices", "12", "--noise", "1", "4",
                 "--jobs", "2", "--no-baseline", "--out", str(out), "--set", "simulation.rounds=2"]) == 0
    (base, noises, out_dir, jobs, baseline), = calls
    assert noises == [1.0, 4.0] and out_dir == out and jobs == 2 and baseline is False
    assert base.population.num_devices == 12 and base.simulation.rounds == 2
    assert base.simulation.cohort_size == 12  # the quickstart scenario is the base
    assert base.model.path == str(tiny_model_dir)
    report = (out / "report.md").read_text()
    assert "epsilon 3.2" in report and json.loads((out / "study.json").read_text())["noises"]
    assert "+0.0100 [+0.0000, +0.0200]" in report and "0.4000 [0.3000, 0.5000]" in report  # the sweep's columns


@pytest.mark.integration
def test_heterogeneity_runs_two_small_fleets_and_reports_tiers(tiny_model_dir, tmp_path):
    out = tmp_path / "het"
    fleet = ["simulation.rounds=1", "simulation.cohort_size=6", "simulation.overcommit=1.0", "simulation.deadline_s=0",
             "simulation.workers=2", 'heterogeneity.availability="always"', "heterogeneity.dropout_scale=0"]
    inputs = _inputs("heterogeneity", tiny_model_dir, devices=6, out=out)
    inputs.config = str(__import__("fedasls.scenarios", fromlist=["scenario_path"]).scenario_path("heterogeneity"))
    inputs.user_overrides += fleet
    st.run_study(inputs)
    rows = _rows(out)
    assert {(r["variant"], r["device_id"]) for r in rows} == {(v, d) for v in ("heterogeneous", "homogeneous")
                                                              for d in range(6)}
    assert {r["tier"] for r in rows if r["variant"] == "homogeneous"} == {"mid"}
    assert len({r["tier"] for r in rows if r["variant"] == "heterogeneous"}) > 1
    assert all(r["participated"] == 1 for r in rows)
    het = {r["device_id"]: r for r in rows if r["variant"] == "heterogeneous"}
    hom = {r["device_id"]: r for r in rows if r["variant"] == "homogeneous"}
    low = [d for d, r in het.items() if r["tier"] == "low"]
    assert low and all(het[d]["buffer_budget_bytes"] < hom[d]["buffer_budget_bytes"] for d in low)  # storage tier
    assert (out / "uplift_by_tier.png").stat().st_size > 0 and "## By device tier" in (out / "report.md").read_text()
