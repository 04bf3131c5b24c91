"""simulations.compare_studies: paired differences between two study runs on the same devices."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.compare_studies import main

FIELDS = ["variant", "device_id", "rouge1", "perplexity", "base_perplexity", "answer_words", "reference_words"]


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _row(device: int, rouge1: float, words: float, variant: str = "full@65536") -> dict:
    return {"variant": variant, "device_id": device, "rouge1": rouge1, "perplexity": 20.0 - device,
            "base_perplexity": 25.0, "answer_words": words, "reference_words": 100.0}


def test_differences_are_paired_by_device_over_the_devices_both_runs_hold(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row(0, 0.1, 90), _row(1, 0.2, 130), _row(2, 0.3, 100)])
    b = _run(tmp_path / "b", [_row(0, 0.2, 120), _row(1, 0.2, 100), _row(2, 0.5, 100), _row(3, 0.9, 0)])
    assert main([str(a), str(b), "rouge1", "length_gap", "loss_reduction"]) == 0
    out = capsys.readouterr().out
    assert "rouge1: +0.1000" in out and "over 3 devices" in out  # (0.1 + 0 + 0.2) / 3; device 3 has no pair
    assert f"length_gap: {((20 - 10) + (0 - 30) + 0) / 3:+.4f}" in out
    assert "loss_reduction: +0.0000 [+0.0000, +0.0000]" in out  # derived from equal perplexities


def test_runs_with_several_shared_variants_need_one_named(tmp_path, capsys):
    rows = [_row(0, 0.1, 90), _row(0, 0.2, 90, variant="random@65536")]
    a, b = _run(tmp_path / "a", rows), _run(tmp_path / "b", rows)
    assert main([str(a), str(b), "rouge1"]) == 2
    assert "--variant" in capsys.readouterr().err
    assert main([str(a), str(b), "rouge1", "--variant", "random@65536"]) == 0
    with pytest.raises(SystemExit, match="neither results.csv nor results.jsonl"):
        main([str(tmp_path / "missing"), str(b), "rouge1"])


def test_variants_of_different_names_pair_with_variant_b(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row(0, 0.1, 90), _row(1, 0.2, 90)])
    b = _run(tmp_path / "b", [_row(0, 0.4, 90, variant="full"), _row(1, 0.2, 90, variant="full"),
                              _row(0, 0.9, 90, variant="fixed-schedule")])
    assert main([str(a), str(b), "rouge1"]) == 2  # no variant in common
    assert main([str(a), str(b), "rouge1", "--variant-b", "nope"]) == 2
    assert "holds ['fixed-schedule', 'full']" in capsys.readouterr().err
    assert main([str(a), str(b), "rouge1", "--variant-b", "full"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("full - full@65536:") and "rouge1: +0.1500" in out and "over 2 devices" in out


def test_an_unfinished_run_is_read_from_its_results_jsonl(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row(0, 0.1, 90), _row(1, 0.2, 90)])
    b = tmp_path / "b"
    b.mkdir()
    # a study appends a line per finished row; the last one may still be being written
    (b / "results.jsonl").write_text(json.dumps(_row(1, 0.5, 90)) + "\n" + json.dumps(_row(0, 0.9, 90))[:20])
    assert main([str(a), str(b), "rouge1"]) == 0
    out = capsys.readouterr().out
    assert "rouge1: +0.3000" in out and "over 1 devices" in out
    (b / "results.jsonl").write_text("{not json\n" + json.dumps(_row(1, 0.5, 90)) + "\n")
    with pytest.raises(SystemExit, match="results.jsonl:1 is not a JSON row"):
        main([str(a), str(b), "rouge1"])


def test_rows_added_after_the_last_report_are_read_from_results_jsonl(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row(0, 0.1, 90, variant="full"), _row(1, 0.2, 90, variant="full")])
    b = _run(tmp_path / "b", [_row(0, 0.3, 90, variant="profiling-only")])  # the report of its first variant
    rows = [_row(0, 0.3, 90, variant="profiling-only"), _row(0, 0.6, 90, variant="fixed-schedule"),
            _row(1, 0.4, 90, variant="fixed-schedule")]
    (b / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(a), str(b), "rouge1", "--variant", "full", "--variant-b", "fixed-schedule"]) == 0
    out = capsys.readouterr().out
    assert "rouge1: +0.3500" in out and "over 2 devices" in out
