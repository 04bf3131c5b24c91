"""Paired differences between two study runs on the same devices (e.g. one setting changed).

    python -m simulations.compare_studies RUN_A RUN_B METRIC [METRIC ...] [--variant NAME] [--variant-b NAME]

For each METRIC (a column of the run's results.jsonl, else of its results.csv, or
`length_gap`: |answer_words - reference_words|), the mean of the per-device differences B - A over
the devices both runs finished, with a 95% bootstrap CI over devices (the study's own
`paired_difference`). Both runs must hold the variant (default: the
only one both have); --variant-b names RUN_B's when the two differ (e.g. `full@65536` of a selection
run against `full` of an asls run on the same devices).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from fedasls.config import ConfigError
from simulations.study import RESULTS_FILE, paired_difference, read_results, with_derived


def read_rows(run: Path) -> list[dict[str, Any]]:
    """A study folder's rows, each with the derived `loss_reduction` and `length_gap`: its results.jsonl
    where there is one (every finished row, also those a run added after its last report, e.g. variants
    added with --no-references), else its results.csv."""
    path, partial = run / "results.csv", run / RESULTS_FILE
    if partial.is_file():
        try:
            rows = read_results(partial)
        except ConfigError as exc:
            raise SystemExit(f"compare_studies: {exc}") from None
    elif path.is_file():
        with path.open(newline="") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        raise SystemExit(f"compare_studies: neither results.csv nor {RESULTS_FILE} in {run}: pass a study's --out folder")
    return [_with_length_gap(with_derived(row)) for row in rows]


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _with_length_gap(row: dict[str, Any]) -> dict[str, Any]:
    """`length_gap`: |answer_words - reference_words| where both are numbers."""
    words, reference = row.get("answer_words"), row.get("reference_words")
    if isinstance(words, (int, float)) and isinstance(reference, (int, float)):
        return {**row, "length_gap": abs(float(words) - float(reference))}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.compare_studies", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("metrics", nargs="+", metavar="METRIC")
    parser.add_argument("--variant", help="the variant to compare (default: the one both runs hold)")
    parser.add_argument("--variant-b", help="RUN_B's variant when it differs from RUN_A's (default: --variant)")
    args = parser.parse_args(argv)
    a, b = read_rows(args.run_a), read_rows(args.run_b)
    names_a, names_b = {r["variant"] for r in a}, {r["variant"] for r in b}
    if args.variant_b:
        variant = args.variant or (next(iter(names_a)) if len(names_a) == 1 else None)
        variant_b = args.variant_b
        if variant not in names_a or variant_b not in names_b:
            print(f"compare_studies: {args.run_a} holds {sorted(names_a)}, {args.run_b} holds {sorted(names_b)}; "
                  "name one of each with --variant and --variant-b", file=sys.stderr)
            return 2
    else:
        shared = sorted(names_a & names_b)
        variant = args.variant or (shared[0] if len(shared) == 1 else None)
        if variant is None or variant not in shared:
            print(f"compare_studies: the runs share the variants {shared or 'none'}; pick one with --variant "
                  "(or name each run's with --variant and --variant-b)", file=sys.stderr)
            return 2
        variant_b = variant
    # One list with the two runs' rows as variants "a" and "b": the study's own paired statistic.
    rows = [{**r, "variant": "a"} for r in a if r["variant"] == variant] + \
           [{**r, "variant": "b"} for r in b if r["variant"] == variant_b]
    label = variant if variant_b == variant else f"{variant_b} - {variant}"
    print(f"{label}: {args.run_b} - {args.run_a} (mean of per-device differences, 95% bootstrap CI)")
    for metric in args.metrics:
        mean, low, high, n = paired_difference(rows, metric, "b", "a")
        print(f"  {metric}: {mean:+.4f} [{low:+.4f}, {high:+.4f}] over {n} devices" if n else f"  {metric}: no pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
