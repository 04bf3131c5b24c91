"""Does this environment give a study run's greedy answers? Its stored base-model examples, generated again.

A device study's row keeps, for a device with a kept adapter, the base model's greedy answer to the
device's first held-out question (`example_base`, its first 400 characters). This rebuilds each such
device's question from the run's own settings (study.json: base overrides and the row's variant) and
answers it with the base model here, through the same functions `simulations.study.held_out_example` uses. Identical answers on
every row mean this environment (CPU, library versions, model files) reproduces the run's generation;
where they part, a comparison between a run made here and that run holds the two environments'
numerics as well as what was varied (docs/results/studies.md, "Reproducing a run's greedy answers").

    python -m benchmarks.example_answers benchmarks/baselines/study-selection-real12-loss-gate

Prints one line per row and a summary; writes example_answers.csv under --out.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.measure import RESULTS, parser, write_rows
from simulations.machine import environment
from simulations.study import EXAMPLE_CHARS, base_answer, example_item, resolved_settings

ROWS_FILE = "results.csv"


def parse_args(argv: list[str] | None = None):
    p = parser(__doc__)
    p.add_argument("run", type=Path, help="a finished study folder (study.json and results.csv)")
    p.add_argument("--out", default=str(RESULTS / "example_answers"), help="folder for example_answers.csv")
    return p.parse_args(argv)


def read_run(run: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """study.json and the rows of a finished study folder; a clear error where either is missing."""
    info_path, rows_path = run / "study.json", run / ROWS_FILE
    for path in (info_path, rows_path):
        if not path.is_file():
            raise SystemExit(f"example_answers: {path} is missing: pass the folder of a finished study "
                             "(fedasls study ... --out FOLDER writes study.json and results.csv)")
    with rows_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return json.loads(info_path.read_text()), rows


def first_difference(a: str, b: str) -> int | None:
    """The index of the first character where two texts differ (None where they are equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check(run: Path) -> list[dict[str, Any]]:
    """One row per stored example: device, variant, identical or where the answers part."""
    import torch

    from fedasls.device.worker import DeviceRuntime

    torch.set_num_threads(1)
    info, rows = read_run(run)
    out, runtimes = [], {}
    for row in rows:
        stored = row.get("example_base") or ""
        if not stored:
            continue  # no kept adapter: no example
        variant = row["variant"]
        if variant not in runtimes:
            settings = resolved_settings(info.get("config"), [*info["base_overrides"], *info["variants"][variant]])
            runtimes[variant] = (DeviceRuntime(settings), settings)
        runtime, settings = runtimes[variant]
        item, tokens = example_item(runtime, settings, int(row["device_id"]))
        answer = base_answer(runtime, item.question, tokens)[:EXAMPLE_CHARS]
        part = first_difference(answer, stored)
        out.append({"variant": variant, "device_id": int(row["device_id"]), "identical": part is None,
                    "parts_at_char": part, "stored_in": row.get("environment") or "not recorded",
                    "here": answer[:80], "stored": stored[:80]})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = check(args.run)
    here = environment()
    for r in rows:
        said = "identical" if r["identical"] else f"parts at character {r['parts_at_char']}"
        print(f"{r['variant']} device {r['device_id']}: {said} (stored in: {r['stored_in']})")
    same = sum(r["identical"] for r in rows)
    print(f"{same} of {len(rows)} stored base-model examples generated identically here ({here})")
    path = write_rows(Path(args.out) / "example_answers.csv", rows)
    print(f"written: {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
