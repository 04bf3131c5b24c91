"""`--overwrite` never loses a byte that is not a fedasls run: it removes only a folder holding a
run (or a device store), and only once every input has been validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedasls.config import ConfigError, Settings
from fedasls.device.store import DeviceStore
from server.checkpoint import mark_run_dir
from simulations.cli import main
from simulations.validation import folders_to_replace, replace_folders


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _bad_dataset_argv(results: Path, name: str) -> list[str]:
    return ["simulate", "--name", name, "--overwrite", "--set", f"simulation.output_dir={json.dumps(str(results))}",
            "--set", "population.source='jsonl'", "--set", f"population.jsonl_path={json.dumps(str(results / 'nope.jsonl'))}"]


@pytest.mark.parametrize("name", ["../important", "important-abs"])
def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, capsys, name):
    results = tmp_path / "results"
    target = _precious(tmp_path / "important")
    if name == "important-abs":
        name = str(target)  # an absolute --name
    assert main(_bad_dataset_argv(results, name)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (target / "thesis.tex").read_text() == "years of work"


def test_overwrite_of_a_real_run_waits_until_the_inputs_are_valid(tmp_path, capsys):
    results = tmp_path / "results"
    run = results / "k6"
    mark_run_dir(run)
    (run / "rounds.jsonl").write_text("{}\n")
    assert main(_bad_dataset_argv(results, "k6")) == 2  # the dataset is missing: refused before deleting
    assert "nope.jsonl" in capsys.readouterr().err
    assert (run / "rounds.jsonl").is_file()


def test_folders_to_replace_checks_and_deletes_nothing_itself(tmp_path):
    run = tmp_path / "run"
    mark_run_dir(run)
    (run / "rounds.jsonl").write_text("{}\n")
    settings = Settings()
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        folders_to_replace(run, settings, overwrite=False)
    approved = folders_to_replace(run, settings, overwrite=True)
    assert approved == [run] and (run / "rounds.jsonl").is_file()
    replace_folders(approved)
    assert not run.exists()
    assert folders_to_replace(tmp_path / "fresh", settings, overwrite=False) == []


def test_store_dir_is_removed_only_when_it_is_a_device_store(tmp_path):
    other = _precious(tmp_path / "photos")
    settings = Settings.model_validate({"simulation": {"store_dir": str(other)}})
    with pytest.raises(ConfigError, match="holds no fedasls device store"):
        folders_to_replace(tmp_path / "run", settings, overwrite=True)
    store_root = tmp_path / "store"
    DeviceStore(store_root).save(3, {"cursor": 1})
    settings = Settings.model_validate({"simulation": {"store_dir": str(store_root)}})
    assert folders_to_replace(tmp_path / "run", settings, overwrite=True) == [store_root]
    assert (other / "thesis.tex").is_file()
