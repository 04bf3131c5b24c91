"""The `fedasls` command line: help everywhere, clear errors, real commands on small inputs."""

from __future__ import annotations

import pytest

from simulations.cli import main


@pytest.mark.parametrize("argv", [[], ["model"], ["model", "build"], ["population", "show"], ["population", "export"],
                                  ["device"], ["simulate"],
                                  ["fleet"], ["fleet", "start"], ["fleet", "run"], ["fleet", "status"],
                                  ["fleet", "stop"], ["fleet", "up"], ["docs"], ["docs", "config"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    assert "usage: fedasls" in capsys.readouterr().out


def test_help_imports_no_model_library():
    """`fedasls --help` answers at once: reading the command line and the preset registry imports no
    torch or transformers (they took 4 s here before the first line of help)."""
    import subprocess
    import sys

    code = ("import sys; from simulations.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: fedasls" in out and "LOADED []" in out, out[-300:]


def test_unknown_setting_is_a_clear_error(capsys):
    assert main(["population", "show", "--set", "population.num_devicez=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'population.num_devicez'" in err and "Traceback" not in err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["device", "--model", str(tmp_path / "nope"), "--set", "population.num_devices=2"])
    assert code == 2
    assert "Hugging Face causal-LM folder" in capsys.readouterr().err


def test_population_show_prints_personas_and_streams(capsys):
    assert main(["population", "show", "--ids", "4", "--excerpt", "2", "--set", "population.num_devices=10"]) == 0
    out = capsys.readouterr().out
    assert "device 4: interests" in out and "preferred:" in out and "stream: 160 interactions" in out


def test_population_show_rejects_ids_outside_the_population(capsys):
    assert main(["population", "show", "--ids", "12", "--set", "population.num_devices=10"]) == 2
    assert "outside the population" in capsys.readouterr().err


def test_device_runs_a_stream_end_to_end(tiny_model_dir, capsys):
    argv = ["device", "--id", "2", "--model", str(tiny_model_dir), "--set", "population.stream_length=30",
            "--set", "population.heldout=2", "--set", "adaptation.epochs=1", "--set", "evaluation.max_new_tokens=8",
            "--set", "synthesis.method='fallback'"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "30 interactions" in out and "adaptations" in out
    for metric in ("rouge1", "rougeL", "perplexity", "accept_rate"):
        assert metric in out


def test_fleet_commands_without_a_fleet_are_clear_errors(tmp_path, capsys):
    for action in ("status", "stop", "run"):
        assert main(["fleet", action, "--dir", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert "no fleet recorded" in err and "fedasls fleet start" in err and "Traceback" not in err
    assert main(["fleet", "start", "--nodes", "0", "--dir", str(tmp_path / "f")]) == 2
    assert "at least one SuperNode" in capsys.readouterr().err


def test_sweep_privacy_refuses_a_bad_grid(capsys):
    from simulations.cli import main

    assert main(["sweep", "privacy", "--noise", "-1", "--jobs", "1"]) == 2
    assert "noise multipliers must be finite numbers > 0" in capsys.readouterr().err


def test_population_export_writes_a_jsonl_population_with_the_same_users(tmp_path, capsys):
    from fedasls.data.loaders import JsonlPopulation
    from fedasls.data.population import SyntheticPopulation

    out = tmp_path / "users.jsonl"
    argv = ["population", "export", "--out", str(out), "--count", "3", "--set", "population.stream_length=40",
            "--set", "population.heldout=4"]
    assert main(argv) == 0 and "population.source=jsonl" in capsys.readouterr().out
    exported = JsonlPopulation(out, partition="user", heldout=4)
    synthetic = SyntheticPopulation(10, stream_length=40, heldout=4)
    assert exported.num_devices == 3
    for i in range(3):
        assert [it.preferred for it in exported.heldout(i)] == [it.preferred for it in synthetic.heldout(i)]
        assert all(it.domain in {x.domain for x in synthetic.stream(i)} | {x.domain for x in synthetic.heldout(i)}
                   for it in exported.stream(i))
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # nothing is replaced silently
