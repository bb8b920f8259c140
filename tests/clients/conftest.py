"""Client fixtures: one real `python -m famserve.server.main` process serving the tiny model with an API key (small
blocks, as the session tests use), a FamserveClient for it and a tokenizer to count tokens exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from client_helpers import API_KEY, server_args
from server_process import ServerProcess

from famserve.clients import FamserveClient


@pytest.fixture(scope="session")
def start_client_server(start_server, tiny_llama_dir: Path) -> Callable[..., ServerProcess]:
    """start(**flag overrides) -> a ready server with the client tests' flags (server_args)."""
    return lambda **overrides: start_server(server_args(tiny_llama_dir, **overrides))


@pytest.fixture(scope="session")
def server(start_client_server) -> ServerProcess:
    return start_client_server()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[FamserveClient]:
    with FamserveClient(server.url, api_key=API_KEY, timeout_s=120) as client:
        yield client


@pytest.fixture(scope="session")
def count_tokens(tiny_llama_dir: Path) -> Callable[[str], int]:
    """Tokens the server's tokenizer makes of a text (no special tokens), counted here independently."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
