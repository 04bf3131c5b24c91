"""docs/configuration.md is generated from the settings' field descriptions and must not go stale."""

from __future__ import annotations

import re

from fedasls.config import Settings
from simulations.cli import main
from simulations.settings_docs import COMMAND, DEFAULT_PATH, allowed, check, configuration_markdown, sections


def test_the_committed_page_is_what_the_generator_writes():
    problem = check(DEFAULT_PATH)
    assert problem is None, problem


def test_the_page_lists_every_table_and_key_with_its_description():
    page = configuration_markdown()
    tables = re.split(r"^## ", page, flags=re.M)[1:]
    by_name = {chunk.split("]", 1)[0].lstrip("["): chunk for chunk in tables}
    assert list(by_name) == list(Settings.model_fields)
    for name, model in sections():
        for key, field in model.model_fields.items():
            assert field.description, f"[{name}] {key} has no Field(description=...): add one, then run `{COMMAND}`"
            row = next((line for line in by_name[name].splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"[{name}] {key} is missing from the page"
            assert " ".join(field.description.split()).replace("|", "\\|") in row


def test_allowed_values_and_ranges_come_from_the_constraints():
    fields = {name: model.model_fields for name, model in sections()}
    assert allowed(fields["simulation"]["sampling"]) == '"available" / "poisson"'
    assert allowed(fields["feedback"]["accept_threshold"]) == ">= 0, <= 1"
    assert allowed(fields["adaptation"]["shrink_scales"]) == "at least 1 item; each > 0, <= 1"
    assert allowed(fields["federated"]["dp"]) == "true / false"


def test_check_fails_on_a_stale_page_and_the_command_rewrites_it(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text("# Configuration\n\nan old page\n")
    assert main(["docs", "config", "--out", str(page), "--check"]) == 1
    err = capsys.readouterr().err
    assert "is stale" in err and COMMAND in err
    assert main(["docs", "config", "--out", str(page)]) == 0
    assert page.read_text() == configuration_markdown()
    assert main(["docs", "config", "--out", str(page), "--check"]) == 0
    assert main(["docs", "config", "--out", str(tmp_path / "absent.md"), "--check"]) == 1
    assert "does not exist" in capsys.readouterr().err
