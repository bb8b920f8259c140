"""README.md: its configuration and metrics tables are the ones generated from the code (Settings, the metrics
registry), `python -m famserve.server.settings_doc` rewrites and checks them, the two fresh-machine commands open it,
and the sections the issue asks for are there (the sessions walkthrough between its markers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import REPO

from famserve.server.settings import Settings
from famserve.server.settings_doc import REGENERATE, TABLES, metrics_table, settings_table, with_tables

README = REPO / "README.md"
TEXT = README.read_text()
SECTIONS = ["## Two commands", "## Install", "## Quick start", "## Configuration", "## Deploy", "## Operations",
            "### Health and readiness", "### Graceful shutdown", "### Metrics", "### Backups of the state directory"]


def run_settings_doc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "famserve.server.settings_doc", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_readme_tables_are_generated_from_the_code() -> None:
    assert with_tables(TEXT) == TEXT, f"README.md's generated tables are out of date: run {REGENERATE}"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_settings_table_has_a_row_per_setting(name: str) -> None:
    flag, env = f"`--{name.replace('_', '-')}`", f"`FAMSERVE_{name.upper()}`"
    assert [row for row in settings_table().splitlines() if row.startswith(f"| {flag} | {env} |")]


@pytest.mark.parametrize(("name", "row"), [
    ("port", "| `--port` | `FAMSERVE_PORT` | `8000` | TCP port to listen on |"),
    ("api_keys", ("| `--api-keys` | `FAMSERVE_API_KEYS` | none | accepted API keys, comma-separated; none = no "
                  "authentication |")),
    ("dtype", ("| `--dtype` | `FAMSERVE_DTYPE` | `auto` | weights and state dtype; auto: bfloat16 on a GPU (float16 on "
               "one without bf16), float32 on the CPU (bfloat16 is faster on CPUs with AMX: ask for it); one of `auto`, "
               "`float32`, `bfloat16`, `float16` |")),
    ("max_body_bytes", ("| `--max-body-bytes` | `FAMSERVE_MAX_BODY_BYTES` | `16777216` (16 MiB) | largest request "
                        "body, in bytes (larger: 413) |")),
])
def test_settings_table_rows(name: str, row: str) -> None:
    """Defaults: none for None and empty lists, byte sizes also in MiB/GiB; Literal types list their choices."""
    assert row in settings_table().splitlines()


def test_metrics_table_lists_every_exported_family_by_its_sample_name() -> None:
    rows = metrics_table().splitlines()[2:]
    names = [re.match(r"\| `(\w+)` \| (\w+) \|", row).groups() for row in rows]
    assert ("famserve_requests_total", "counter") in names
    assert ("famserve_request_duration_seconds", "histogram") in names
    assert ("famserve_num_requests_waiting", "gauge") in names  # the engine's, present before the model loads
    assert len(names) == len(set(names))


def test_write_then_check(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text("".join(f"# Title\n\n<!-- {marker}:begin -->\n| old |\n<!-- {marker}:end -->\n\nafter\n"
                             for marker in TABLES))
    check = run_settings_doc("--check", str(stale))
    assert check.returncode == 1 and REGENERATE in check.stderr
    assert run_settings_doc("--write", str(stale)).returncode == 0
    assert run_settings_doc("--check", str(stale)).returncode == 0
    written = stale.read_text()
    assert settings_table() in written and metrics_table() in written and "| old |" not in written
    assert written.count("after\n") == len(TABLES)


def test_missing_markers_are_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "README.md"
    plain.write_text("# no markers\n")
    result = run_settings_doc("--write", str(plain))
    assert result.returncode == 2 and "<!-- settings-table:begin -->" in result.stderr
    assert plain.read_text() == "# no markers\n"


def test_the_two_fresh_machine_commands_open_the_readme() -> None:
    first_block = TEXT.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make serve", "make test"]
    assert re.search(r"^## .*$", TEXT, re.MULTILINE).group() == "## Two commands"


def test_sections_are_there_in_order() -> None:
    positions = [TEXT.index(f"\n{heading}\n") for heading in SECTIONS]
    assert positions == sorted(positions)


def test_sessions_walkthrough_markers() -> None:
    begin, end = "<!-- sessions-walkthrough:begin -->", "<!-- sessions-walkthrough:end -->"
    assert TEXT.count(begin) == 1 and TEXT.count(end) == 1
    assert TEXT.index("## Sessions") < TEXT.index(begin) < TEXT.index(end) < TEXT.index("## Training FAM")
