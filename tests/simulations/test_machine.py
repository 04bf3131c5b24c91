"""The machine record studies and benchmarks write: it names the CPU model, so CPU seconds from two
machines are not compared as if they came from one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from simulations.machine import cpu_model


def test_a_study_run_from_the_installed_cli_records_the_cpu_model(tmp_path):
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    assert names and cpu_model() == names[0]
    # `fedasls study` runs outside the repository's root, where benchmarks/ is not importable
    code = "import json; from simulations.study import machine_info; print(json.dumps(machine_info()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    record = json.loads(out.stdout)
    assert record["cpu"] == names[0] and record["cores"] >= 1
    assert {"memory_gib", "torch_threads", "torch", "peft"} <= set(record)
