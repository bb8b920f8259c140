"""Server fixtures: a real `python -m famserve.server.main` process on 127.0.0.1 and a free port, serving the tiny
random model (one process for the whole session; modules that need other settings start their own with
start_server, from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_process import TINY_SERVER_LIMITS, ServerProcess, tiny_server_args


@pytest.fixture(scope="session")
def tiny_args(tiny_llama_dir: Path):
    """tiny_args(**overrides) -> the flags of a tiny-model server (see tiny_server_args)."""
    return lambda **overrides: tiny_server_args(tiny_llama_dir, **overrides)


@pytest.fixture(scope="session")
def limits() -> dict[str, int]:
    """The limits the shared tiny server runs with."""
    return dict(TINY_SERVER_LIMITS)


@pytest.fixture(scope="session")
def tiny_server(start_server, tiny_llama_dir: Path) -> ServerProcess:
    """The shared tiny-model server (no API keys, TINY_SERVER_LIMITS)."""
    return start_server(tiny_server_args(tiny_llama_dir))


@pytest.fixture(scope="session")
def base_url(tiny_server: ServerProcess) -> str:
    return tiny_server.url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client
