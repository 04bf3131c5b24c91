"""Bad input fails fast on the driver: `fedasls simulate` as a user runs it, one subprocess per case.

Every case must exit 2 with one paragraph naming what, where and how to fix, no traceback, and
before Ray starts (nothing of Flower or Ray in the output, no device store written).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedasls.config import Settings
from fedasls.config import settings_toml

pytestmark = pytest.mark.integration  # the CLI in subprocesses, up to Ray start


def fedasls_command() -> list[str]:
    exe = shutil.which("fedasls")
    return [exe] if exe else [sys.executable, "-m", "simulations.cli"]


def gpt2_folder(tiny_model_dir: Path, out: Path) -> Path:
    """A real, tiny non-Llama causal LM (GPT-2 architecture) with a working tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir, tmp_path_factory):
    """Run every bad-input case at once (each is a real `fedasls simulate` process)."""
    tmp = tmp_path_factory.mktemp("bad")
    out = tmp / "results"
    good = '{"instruction": "How do I keep basil fresh?", "output": "Trim it and keep it in water."}\n'
    data = {
        "missing": tmp / "nope.jsonl",
        "empty": write(tmp / "empty.jsonl", "\n\n"),
        "malformed": write(tmp / "malformed.jsonl", good + '{"instruction": "x", "output": \n'),
        "non_utf8": write(tmp / "latin1.jsonl", good.encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")),
        "too_few": write(tmp / "few.jsonl", good * 3),
    }
    base = ["simulate", "--model", str(tiny_model_dir), "--set", f"simulation.output_dir='{out}'"]

    def jsonl(path: Path, devices: int = 2) -> list[str]:
        return [*base, "--set", "population.source='jsonl'", "--set", f"population.jsonl_path='{path}'",
                "--set", f"population.num_devices={devices}", "--set", "simulation.cohort_size=1"]

    def posts(path: Path, devices: int = 2) -> list[str]:
        return [*base, "--set", "population.source='stackexchange'", "--set", f"population.posts_path='{path}'",
                "--set", f"population.num_devices={devices}", "--set", "simulation.cohort_size=1"]

    fragment = Path(__file__).resolve().parents[1] / "data" / "stackexchange" / "coffee.stackexchange.com" / "Posts.xml"
    users = write(tmp / "Users.xml", '<?xml version="1.0" encoding="utf-8"?>\n<users>\n  <row Id="1" />\n</users>\n')
    broken = write(tmp / "Posts.xml", fragment.read_bytes().replace(b' Score="7"', b' Score="7', 1))

    scenario = write(tmp / "mine.toml", "[synthesis]\nrewrites = 2\nrouge_min = 0.9\nrouge_max = 0.5\n")
    existing = out / "taken"
    existing.mkdir(parents=True)
    write(existing / "rounds.jsonl", "{}\n")
    recorded = Settings.model_validate({"model": {"path": str(tiny_model_dir)},
                                        "population": {"num_devices": 4, "stream_length": 40},
                                        "simulation": {"cohort_size": 2, "output_dir": str(out)}})
    resumable = out / "resumable"
    resumable.mkdir()
    write(resumable / "config.toml", settings_toml(recorded))
    write(resumable / "checkpoint.json", json.dumps({"rounds_done": 1, "coordinator": {}, "wall_seconds": 1.0,
                                                     "device_rounds": 2, "failed": 0}))
    truncated = out / "truncated"
    shutil.copytree(resumable, truncated)
    write(truncated / "checkpoint.json", '{"rounds_done": 1, "coordin')
    cases = {
        "missing": jsonl(data["missing"]),
        "empty": jsonl(data["empty"]),
        "malformed": jsonl(data["malformed"]),
        "non_utf8": jsonl(data["non_utf8"]),
        "too_few": jsonl(data["too_few"], devices=3),
        "posts_missing": posts(tmp / "site" / "Posts.xml"),
        "posts_wrong_root": posts(users),
        "posts_malformed": posts(broken),
        "posts_too_few_authors": posts(fragment, devices=3),
        "non_llama_model": ["simulate", "--model", str(gpt2_folder(tiny_model_dir, tmp / "gpt2")),
                            "--set", f"simulation.output_dir='{out}'", "--set", "population.num_devices=20"],
        "rouge_min_max": [*base, "--config", str(scenario)],
        "feedback_thresholds": [*base, "--set", "feedback.edit_threshold=0.9"],
        "existing_results": [*base, "--name", "taken"],
        "resume_other_settings": ["simulate", "--resume", str(resumable), "--set", "population.stream_length=120"],
        "truncated_checkpoint": ["simulate", "--resume", str(truncated)],
    }
    env = {**os.environ, "FEDASLS_CACHE": str(tmp / "cache")}  # nothing may build the default model
    procs = {name: subprocess.Popen([*fedasls_command(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env) for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    return results, out, tmp


EXPECTED = {
    "missing": ["dataset file not found", "nope.jsonl", "population.jsonl_path"],
    "empty": ["empty.jsonl", "no records found", "one JSON object per line"],
    "malformed": ["malformed.jsonl:2", "invalid JSON", "each line must be one JSON object"],
    "non_utf8": ["latin1.jsonl:2", "not UTF-8 text (byte 0xe9", "iconv"],
    "too_few": ["few.jsonl", "too few records", "lower population.num_devices"],
    "posts_missing": ["Stack Exchange dump not found", "site/Posts.xml", "population.posts_path"],
    "posts_wrong_root": ["Users.xml:2", "root element is <users>, not <posts>", "Fix:"],
    "posts_malformed": ["Posts.xml:20: not well-formed XML", "not well-formed XML", "re-extract"],
    "posts_too_few_authors": ["too few authors", "population.min_answers_per_user = 20", "Fix:"],
    "non_llama_model": ["'gpt2' model", "adaptation.target_modules", "c_attn", "Fix:"],
    "rouge_min_max": ["rouge_min (0.9) is above rouge_max (0.5)", "mine.toml line 3", "mine.toml line 4",
                      "Fix: set rouge_min <= rouge_max"],
    "feedback_thresholds": ["edit_threshold (0.9) is above accept_threshold (0.5)",
                            "--set feedback.edit_threshold=0.9", "Fix:"],
    "existing_results": ["taken already exists", "--overwrite"],
    "resume_other_settings": ["population.stream_length: run has 40, given 120", "Fix: drop"],
    "truncated_checkpoint": ["checkpoint.json is truncated or corrupt", "Fix:"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_gives_one_clear_paragraph_and_exit_2(outcomes, case):
    results, out, _ = outcomes
    code, stdout, stderr = results[case]
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("fedasls: error: ") and "Traceback" not in stderr + stdout, stderr
    for needle in EXPECTED[case]:
        assert needle in stderr, (needle, stderr)
    assert "ray" not in (stdout + stderr).lower().replace("array", "")  # it stopped before Ray started
    assert not list(out.glob("*/store"))  # no device ran


def test_nothing_was_overwritten(outcomes):
    _, out, tmp = outcomes
    assert (out / "taken" / "rounds.jsonl").read_text() == "{}\n"
    assert "stream_length = 40" in (out / "resumable" / "config.toml").read_text()
    assert not (tmp / "cache").exists()  # no model was built for a run that could not start
