"""Damaged files and unwritable folders end in one paragraph and a non-zero exit, never a traceback;
valid-but-odd settings are warned about, never silently run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from simulations.cli import main


def _copy_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _device(model: Path) -> list[str]:
    return ["device", "--model", str(model), "--set", "population.num_devices=2", "--set", "population.stream_length=20"]


def test_a_damaged_tokenizer_is_named(tiny_model_dir, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path)
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    assert main(_device(model)) == 2
    err = capsys.readouterr().err
    assert "tokenizer cannot be loaded" in err and "Traceback" not in err


def test_garbage_weights_are_named_before_anything_loads(tiny_model_dir, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 100)
    assert main(_device(model)) == 2
    err = capsys.readouterr().err
    assert f"{weights.name} cannot be read" in err and "Traceback" not in err


def test_a_model_saved_as_another_kind_is_not_run_as_a_causal_lm(tiny_model_dir, tmp_path, capsys):
    model = _copy_model(tiny_model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"architectures": ["BertForMaskedLM"]}))
    assert main(_device(model)) == 2
    assert "not as a causal language model" in capsys.readouterr().err


def test_a_damaged_records_file_is_named_by_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rounds.jsonl").write_text('{"round": 1}\n<<garbage>>\n')
    (run / "device_rounds.jsonl").write_text("")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "rounds.jsonl:2 is not a JSON object" in err and "Traceback" not in err


def test_an_unwritable_output_folder_is_one_paragraph(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["simulate", "--model", str(tiny_model_dir), "--set", f"simulation.output_dir='{blocker / 'results'}'",
            "--set", "population.num_devices=4", "--set", "simulation.rounds=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot read or write" in err and "Traceback" not in err


def test_a_cohort_larger_than_the_population_is_warned_about(capsys):
    assert main(["population", "show", "--count", "1", "--set", "population.num_devices=6",
                 "--set", "simulation.cohort_size=10"]) == 0
    assert "warning: simulation.cohort_size = 10 is larger than population.num_devices = 6" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_times_are_refused(value, capsys):
    assert main(["population", "show", "--set", f"simulation.start_time_s={value}"]) == 2
    assert "finite number" in capsys.readouterr().err
