"""Helpers shared by the client tests (a plain module: every conftest.py is module `conftest`, so tests cannot
import from one by name): the server's flags and text files."""

from __future__ import annotations

import random
from pathlib import Path

API_KEY = "client-test-key"
MODEL_NAME = "tiny-llama"
WORDS = "the quick brown fox jumps over lazy dog memory attention feedback block stream".split()


def server_args(model_dir: Path, **overrides: object) -> list[str]:
    """Flags of the client tests' server (its sessions go to a folder of its own: ServerProcess sees to that)."""
    options = {"model": model_dir, "served_model_name": MODEL_NAME, "threads": 1, "block_size": 8,
               "memory_blocks": 1, "api_keys": API_KEY, **overrides}
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def write_text_file(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """Lines of random words, each ending in ".\\n", about size_bytes in all (written line by line)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as file:
        while file.tell() < size_bytes:
            file.write(" ".join(rng.choice(WORDS) for _ in range(10)) + ".\n")
    return path
