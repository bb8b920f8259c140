"""Start-up and shut-down of the real process: /health answers while the model loads and /ready says 503 until the
engine runs; a model that fails to load ends the process with status 1; bad settings end it with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

STARTUP_TIMEOUT_S = 120.0


def wait_for_health(server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log_text()
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"no /health within {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def test_loading_then_failing_model(start_server, tmp_path) -> None:
    """The model file is a FIFO: loading blocks on it until the test writes, so the loading state is observable."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    server = start_server(["--model", str(fifo), "--threads", "1"], wait=False)
    wait_for_health(server)
    for path in ("/ready", "/v1/models"):
        response = httpx.get(server.url + path)
        assert response.status_code == 503
        assert response.json()["error"] == {"message": "the model is still loading; retry shortly",
                                            "type": "server_error", "param": None, "code": "model_loading"}
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    os.close(os.open(fifo, os.O_WRONLY))  # unblocks the loader's open(); it then finds no GGUF data and fails
    assert server.process.wait(timeout=60) == 1
    assert "cannot load the model" in server.log_text()


def run_serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "famserve.server.main", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--port", "http"], {}, "argument --port: invalid int value: 'http'"),
    (["--mode", "sliding"], {}, "argument --mode: invalid choice: 'sliding'"),
    ([], {"FAMSERVE_MAX_RUNNING": "0"}, "max_running: Input should be greater than 0"),
    (["--api-key-file", "/nonexistent/keys.txt"], {}, "api_key_file: cannot read /nonexistent/keys.txt"),
])
def test_bad_settings_exit_with_status_2(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_serve(args, env)
    assert result.returncode == 2
    assert message in result.stderr


def test_famserve_serve_help_lists_every_setting() -> None:
    result = subprocess.run(["famserve", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    from famserve.server.settings import Settings

    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout
        assert f"FAMSERVE_{name.upper()}" in result.stdout
