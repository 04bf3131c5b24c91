"""Every benchmark and `fedasls` command the docs name exists, so retiring or renaming a script (or a
CLI subcommand) without updating README.md and docs/ fails here.

Checked in README.md and docs/**/*.md; docs/results/explorations.md and CHANGELOG.md record history
(the commands of retired scripts, as they were run) and are left out.

- `python -m benchmarks.NAME` must name a module in benchmarks/.
- `python benchmarks/NAME.py` is how scripts ran before they became modules; the benchmarks import
  `benchmarks.measure`, so that form no longer runs. It may appear only to keep the original command
  of a committed figure visible, for a script that is gone, marked on the same or the next line as
  "(retired script; see explorations.md)" (or, for a renamed one, "since renamed").
- `fedasls SUBCOMMAND [ACTION]` inside inline code or a code block must be a subcommand of
  `simulations.cli.build_parser()`, and ACTION one of its actions when it has any.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from simulations.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
HISTORY = {ROOT / "CHANGELOG.md", ROOT / "docs" / "results" / "explorations.md"}
PAGES = sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")] if p not in HISTORY)
BENCHMARKS = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}

# Lower-case names only: `benchmarks.NAME` and `benchmarks/<name>.py` are placeholders.
MODULE_FORM = re.compile(r"python3? -m benchmarks\.([a-z_][a-z0-9_]*)\b")
SCRIPT_FORM = re.compile(r"python3? benchmarks/([a-z_][a-z0-9_]*)\.py")
HISTORY_MARKS = ("retired script", "since renamed")
FEDASLS = re.compile(r"(?<![\w/.$-])fedasls[ \t]+([a-z][\w-]*)(?:[ \t]+([a-z][\w-]*))?")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """The CLI's subcommands, each with its actions (empty when it takes none)."""

    def choices(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in p._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(choices(sub)) for name, sub in choices(parser).items()}


COMMANDS = subcommands(build_parser())


def code_snippets(text: str) -> list[str]:
    """Inline code spans and code-block lines (fenced or indented by four spaces), the latter
    without their `# comments` (prose)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if line.strip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence or line.startswith("    "):
            out.append(re.sub(r"(^|\s)#.*", "", line))
        else:
            out.extend(INLINE_CODE.findall(line))
    return out


def benchmark_problems(text: str) -> list[str]:
    problems = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for name in MODULE_FORM.findall(line):
            if name not in BENCHMARKS:
                problems.append(f"line {i + 1}: python -m benchmarks.{name}: no benchmarks/{name}.py")
        nearby = (line + " " + (lines[i + 1] if i + 1 < len(lines) else "")).lower()
        for name in SCRIPT_FORM.findall(line):
            if name in BENCHMARKS:
                problems.append(f"line {i + 1}: python benchmarks/{name}.py no longer runs; write "
                                f"python -m benchmarks.{name}")
            elif not any(mark in nearby for mark in HISTORY_MARKS):
                problems.append(f"line {i + 1}: python benchmarks/{name}.py: the script is gone; point to "
                                "docs/results/explorations.md (mark the command '(retired script; see "
                                "explorations.md)') or to the setting that replaced it")
    return problems


def cli_problems(text: str) -> list[str]:
    problems = []
    for snippet in code_snippets(text):
        for command, action in FEDASLS.findall(snippet):
            if command not in COMMANDS:
                problems.append(f"`fedasls {command}`: not a subcommand (there are: {', '.join(sorted(COMMANDS))})")
            elif COMMANDS[command] and action and action not in COMMANDS[command]:  # bare `fedasls fleet`: the group
                problems.append(f"`fedasls {command} {action}`: {command} takes one of "
                                f"{', '.join(sorted(COMMANDS[command]))}")
    return problems


def test_the_checks_find_stale_commands():
    assert "measure" in BENCHMARKS and "throughput" in BENCHMARKS
    assert {"simulate", "fleet", "model"} <= set(COMMANDS) and "up" in COMMANDS["fleet"]
    page = ("Run `python -m benchmarks.throughput` and `python -m benchmarks.speedups`.\n"
            "Every benchmark runs as `python -m benchmarks.NAME` (a placeholder).\n"
            "    python benchmarks/breakdown.py --no-flops\n"
            "    python benchmarks/speedups.py --save-baseline run1   # (retired script; see explorations.md)\n"
            "`python benchmarks/model_build.py` took 111 s.\n")
    found = benchmark_problems(page)
    assert len(found) == 3, found
    assert "benchmarks.speedups" in found[0] and "python -m benchmarks.breakdown" in found[1]
    assert "model_build" in found[2]
    page = ("fedasls simulates a fleet (prose is not a command); `fedasls/device/` is a path.\n"
            "`fedasls simulate --resume DIR`, `fedasls fleet up --nodes 3`, `fedasls --help`\n"
            "    fedasls train --id 3\n"
            "    python -m benchmarks.NAME --help     # fedasls on Flower (a comment is prose)\n"
            "`fedasls fleet launch` and `fedasls model build`\n")
    found = cli_problems(page)
    assert len(found) == 2, found
    assert "fedasls train" in found[0] and "fedasls fleet launch" in found[1]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_benchmark_commands_name_existing_modules(page: Path):
    problems = benchmark_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_fedasls_commands_are_real_subcommands(page: Path):
    problems = cli_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)
