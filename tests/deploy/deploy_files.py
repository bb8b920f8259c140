"""Paths and loaders shared by the deploy tests (a plain module, not a conftest: tests/conftest.py is imported as
`conftest` by other test packages, and a second conftest module here would shadow it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"



def yaml_module() -> Any:
    return pytest.importorskip("yaml", reason="pip install pyyaml")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    return [doc for doc in yaml_module().safe_load_all(path.read_text()) if doc is not None]


# Time an orchestrator must give a replica beyond its drain (shutdown_grace_s) before it kills it: uvicorn's own
# shutdown, snapshotting the sessions held in memory, the engine stopping.
FLUSH_MARGIN_S = 10.0


def setting_names() -> set[str]:
    """Field names of the server's Settings, i.e. the valid suffixes of FAMSERVE_<NAME>, plus the pending ones."""
    from famserve.server.settings import Settings

    return set(Settings.model_fields)


def validate_settings_env(env: dict[str, str]) -> None:
    """Raise pydantic's ValidationError if a FAMSERVE_* value is not valid for its setting (pending ones skipped),
    as the server would at start. Values must be literal (no ${...} interpolation)."""
    from famserve.server.settings import ENV_PREFIX, Settings

    given = {name.removeprefix(ENV_PREFIX).lower(): value for name, value in env.items()}
    Settings(**{name: value for name, value in given.items() if name in Settings.model_fields})


def seconds(duration: str | int) -> float:
    """A compose duration ("60s", "1m30s") or a number of seconds."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    if not duration or parts is None:
        raise ValueError(f"not a duration: {duration!r}")
    hours, minutes, secs = (float(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def unknown_famserve_vars(names: list[str]) -> list[str]:
    """The FAMSERVE_* names that no setting reads (a typo there is silently ignored by the server)."""
    known = setting_names()
    return [name for name in names
            if not (name.startswith("FAMSERVE_") and name.removeprefix("FAMSERVE_").lower() in known)]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    pairs = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs
