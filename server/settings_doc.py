"""README.md's reference tables, generated from the code so the documentation cannot drift from it: the configuration
table from Settings (flag, environment variable, default, description) and the metrics table from the app's
Prometheus registry (name, type, meaning). Each is written between a pair of marker comments.

    python -m famserve.server.settings_doc                    print the tables
    python -m famserve.server.settings_doc --write README.md  replace the tables in README.md
    python -m famserve.server.settings_doc --check README.md  exit 1 if README.md's tables are out of date"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from .settings import ENV_PREFIX, Settings

REGENERATE = "python -m famserve.server.settings_doc --write README.md"


def _default(name: str, field: FieldInfo) -> str:
    """The default as a table cell; byte sizes also in MiB or GiB."""
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
        return f"`{','.join(map(str, value))}`" if value else "none"
    if field.default is None:
        return "none"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    mib, rest = divmod(field.default, 2**20) if isinstance(field.default, int) else (0, 1)
    if name.endswith("_bytes") and mib and not rest:
        return f"`{field.default}` ({mib // 1024} GiB)" if mib % 1024 == 0 else f"`{field.default}` ({mib} MiB)"
    return f"`{field.default}`"


def _choices(field: FieldInfo) -> tuple[str, ...]:
    """The allowed values of a Literal field (Optional included), else ()."""
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(candidate) is Literal:
            return tuple(str(choice) for choice in typing.get_args(candidate))
    return ()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """Every Settings field, in the order of `famserve serve --help`."""
    rows = ["| Flag | Environment variable | Default | Description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = field.description or ""
        if choices := _choices(field):
            description += f"; one of {', '.join(f'`{choice}`' for choice in choices)}"
        rows.append(f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` | {_cell(_default(name, field))} "
                    f"| {_cell(description)} |")
    return "\n".join(rows) + "\n"


def metrics_table() -> str:
    """Every metric family GET /metrics exports, in registration order (the engine's exist before it runs)."""
    from .metrics import Metrics

    rows = ["| Metric | Type | Meaning |", "|---|---|---|"]
    for family in Metrics(lambda: None, lambda: None).registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name  # the sample name
        rows.append(f"| `{name}` | {family.type} | {_cell(family.documentation)} |")
    return "\n".join(rows) + "\n"


# marker name -> the table written between <!-- NAME:begin --> and <!-- NAME:end -->
TABLES: dict[str, Callable[[], str]] = {"settings-table": settings_table, "metrics-table": metrics_table}


def with_tables(text: str) -> str:
    """`text` with what lies between each pair of markers replaced by its table; ValueError if a pair is missing."""
    for marker, render in TABLES.items():
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"no {begin} ... {end} pair found")
        text = text[:start + len(begin)] + "\n" + render() + text[stop:]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m famserve.server.settings_doc",
                                     description="README.md's settings and metrics tables, generated from the code")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="FILE", help="replace the tables between the markers in FILE")
    action.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's tables differ from the code")
    args = parser.parse_args(argv)
    if args.write is None and args.check is None:
        sys.stdout.write("\n".join(render() for render in TABLES.values()))
        return 0
    path: Path = args.write or args.check
    try:
        text = path.read_text()
        updated = with_tables(text)
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if updated == text:
        return 0
    if args.check is not None:
        print(f"{path}: the generated tables are out of date; run: {REGENERATE}", file=sys.stderr)
        return 1
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
