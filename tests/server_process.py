"""A real `python -m famserve.server.main` process on 127.0.0.1 and a free port, for tests (importable by name:
test modules cannot import from conftest.py, which two folders define)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_TIMEOUT_S = 120.0  # a cold start imports torch and transformers; on a busy 2-core machine that can take a while
TINY_MODEL_NAME = "tiny-llama"
# Small limits keep fuzzing and the error catalogue fast; tests read these rather than repeating the numbers.
TINY_SERVER_LIMITS = {"max_tokens_cap": 128, "max_prompt_tokens": 1024, "max_body_bytes": 65536}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One famserve server process; `url` is its base URL. Its log is kept in a file and shown if it fails."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Sessions go to a folder of this server's own unless a test says otherwise (never the working directory).
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "FAMSERVE_STATE_DIR": str(log_path.parent / "state"),
                    **(env or {})}
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "famserve.server.main", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def tiny_server_args(model_dir: Path, **overrides: object) -> list[str]:
    """Flags for a tiny-model server served as TINY_MODEL_NAME: one torch thread (steady on 2 shared cores) and
    TINY_SERVER_LIMITS."""
    options = {"model": model_dir, "served_model_name": TINY_MODEL_NAME, "threads": 1, **TINY_SERVER_LIMITS,
               **overrides}
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", str(value))]
