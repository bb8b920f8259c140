"""Start-up and shut-down of the real process: /health answers while the model loads and /ready says 503 until the
engine runs; a model that fails to load ends the process with status 1; bad settings end it with status 2; SIGTERM
drains (running streams finish, new requests and /ready get 503), persists the sessions and exits with status 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
    # The console script installed beside this interpreter (the venv's), not whatever `famserve` PATH finds first.
    script = Path(sys.executable).with_name("famserve")
    result = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    from famserve.server.settings import Settings

    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout
        assert f"FAMSERVE_{name.upper()}" in result.stdout


SESSION_ARGS = dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2, max_tokens_cap=4096)
BOOK = [f"Page {i}: the keeper wrote down {i * 53 % 97} stones.\n" for i in range(40)]
STREAM_TOKENS = 300
SHUTTING_DOWN = {"message": "the server is shutting down; retry the request", "type": "server_error", "param": None,
                 "code": "shutting_down"}


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def session_answer(url: str, session_id: str) -> str:
    response = httpx.post(f"{url}/v1/sessions/{session_id}/completions", timeout=120,
                          json={"prompt": " The keeper", "max_tokens": 8, "temperature": 0, "commit": False})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


class HeldUpload:
    """A streamed text/plain append (with progress events) whose body stops halfway until finish(): a request the
    server cannot complete before the test lets it, so the drain can be watched while it lasts. The server answers
    its headers at once (before reading the body), so once constructed the append is running."""

    def __init__(self, port: int, session_id: str, text: str) -> None:
        self.rest = text[len(text) // 2:].encode()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.putrequest("POST", f"/v1/sessions/{session_id}/append?stream=true")
        self.conn.putheader("Content-Type", "text/plain")
        self.conn.putheader("Transfer-Encoding", "chunked")
        self.conn.endheaders()
        self._send_chunk(text[:len(text) // 2].encode())
        self.response = self.conn.getresponse()

    def _send_chunk(self, data: bytes) -> None:
        self.conn.send(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self) -> list[str]:
        """Send the rest of the body; the progress events."""
        self._send_chunk(self.rest)
        self.conn.send(b"0\r\n\r\n")
        events = sse_events(iter(self.response.read().decode().splitlines()))
        self.conn.close()
        return events


def test_sigterm_drains_running_streams_refuses_new_work_and_exits_0(start_server, tiny_args, tmp_path) -> None:
    args = tiny_args(state_dir=tmp_path / "state", **SESSION_ARGS)
    server = start_server(args)
    create = {"system_prompt": "You keep records."}
    session_id = httpx.post(f"{server.url}/v1/sessions", json=create).json()["id"]
    control_id = httpx.post(f"{server.url}/v1/sessions", json=create).json()["id"]
    assert httpx.post(f"{server.url}/v1/sessions/{control_id}/append", json={"text": "".join(BOOK)},
                      timeout=120).status_code == 200
    upload = HeldUpload(server.port, session_id, "".join(BOOK))
    assert upload.response.status == 200
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Count the stones."}], "stream": True,
            "max_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))  # the stream is running
        server.process.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{server.url}/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["error"] == SHUTTING_DOWN
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "stream": False})
        assert refused.status_code == 503
        assert refused.json()["error"] == SHUTTING_DOWN
        assert httpx.get(f"{server.url}/health").status_code == 200  # alive: liveness must not restart it now

        events = [first.removeprefix("data: "), *sse_events(lines)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == STREAM_TOKENS

    assert server.process.poll() is None  # the held append still runs, so the server still waits
    progress = upload.finish()
    assert progress[-1] == "[DONE]" and "error" not in progress[-2]
    assert server.process.wait(timeout=60) == 0, server.log_text()

    # Persisted at shutdown: the session's state is one snapshot at its full length, its log empty.
    tokens = json.loads(progress[-2])["session"]["tokens_processed"]
    folder = tmp_path / "state" / session_id
    assert (folder / f"state-{tokens}.safetensors").exists() and (folder / "log.bin").read_bytes() == b""

    restarted = start_server(args)
    info = httpx.get(f"{restarted.url}/v1/sessions/{session_id}").json()
    assert info["tokens_processed"] == tokens
    assert httpx.get(f"{restarted.url}/v1/sessions/{control_id}").json()["tokens_processed"] == tokens
    assert session_answer(restarted.url, session_id) == session_answer(restarted.url, control_id)


def test_drain_deadline_cuts_what_still_runs_and_exits_0(start_server, tiny_args, tmp_path) -> None:
    server = start_server(tiny_args(state_dir=tmp_path / "state", shutdown_grace_s=1, **SESSION_ARGS))
    session_id = httpx.post(f"{server.url}/v1/sessions", json={}).json()["id"]
    upload = HeldUpload(server.port, session_id, "".join(BOOK))  # never finished
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log_text()
    assert time.monotonic() - started >= 1.0
    assert "drain deadline passed: stopping 1 running request(s)" in server.log_text()
    upload.conn.close()
