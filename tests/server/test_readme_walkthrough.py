"""README.md's sessions walkthrough, run as written so it cannot drift: the fenced blocks between the
sessions-walkthrough markers, in order, against a real server on a free port serving the tiny model under the
README's model name. A `famserve serve` block (re)starts the server: the running one gets SIGINT, as from Ctrl+C.
Other sh blocks run in bash, every variable they set carried to the next block as in one terminal; python blocks
run in one namespace, as in one interpreter session. Then: no step answered an error, every session is unchanged
by the restart, and the question asked before the restart gets the same answer after it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from famserve.engine.tokenizer import Tokenizer

from server_process import READY_TIMEOUT_S, ServerProcess, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "127.0.0.1:8000"
README_MODEL = "smollm2-135m"
BLOCK_TIMEOUT_S = 300
BOOK_LINES = 1500  # about 100 KB, tens of thousands of tokens


def walkthrough_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block between the sessions-walkthrough markers."""
    text = README.read_text()
    section = text[text.index("<!-- sessions-walkthrough:begin -->"):text.index("<!-- sessions-walkthrough:end -->")]
    return re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def write_book(path: Path) -> str:
    """A long, deterministic text: the README's questions have something to be about."""
    colours = ["red", "blue", "green", "white"]
    lines = [f"Chapter {i // 100 + 1}, line {i}: the keeper of the lighthouse painted the door {colours[i % 4]} "
             f"and counted {i * 37 % 101} ships." for i in range(BOOK_LINES)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


class ReadmeServer(ServerProcess):
    """The server a README `famserve serve ...` block starts: the same flags, with the tiny model under the README's
    model name, one torch thread, a relative --state-dir inside the walkthrough's folder, and a port fixed for the
    whole walkthrough (so clients made before a restart reach the restarted server; a later --port wins)."""

    def __init__(self, command: str, workdir: Path, model_dir: Path, port: int, log_path: Path) -> None:
        argv = shlex.split(command)
        assert argv[:2] == ["famserve", "serve"], command
        args = argv[2:]
        if "--model" in args:
            args[args.index("--model") + 1] = str(model_dir)
        if "--state-dir" in args:
            i = args.index("--state-dir") + 1
            args[i] = str(workdir / args[i])
        super().__init__([*args, "--served-model-name", README_MODEL, "--threads", "1", "--port", str(port)],
                         log_path)
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def stop_with_ctrl_c(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=READY_TIMEOUT_S)


def run_sh(code: str, env: dict[str, str], cwd: Path) -> tuple[str, dict[str, str]]:
    """Run a block in bash with the environment `env`; returns its output and the environment it ends with (every
    variable it set: `set -a` exports them)."""
    env_file = cwd / ".walkthrough-env"
    script = f"set -euo pipefail -a\n{code}\nenv -0 > {shlex.quote(str(env_file))}\n"
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"README block failed ({result.returncode}):\n{code}\n{result.stderr}"
    ended = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    return result.stdout, ended


def json_documents(output: str) -> list[dict]:
    """The JSON objects in a block's output: bodies printed by curl (one after another, maybe on one line) and
    the data of server-sent events."""
    decoder, documents = json.JSONDecoder(), []
    text = "\n".join(line.removeprefix("data: ") for line in output.splitlines() if line.strip() != "data: [DONE]")
    position = 0
    while (start := text.find("{", position)) != -1:
        document, position = decoder.raw_decode(text, start)
        documents.append(document)
    return documents


def all_sessions(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/sessions", params={"limit": 100}, timeout=60).json()["data"]


def test_readme_sessions_walkthrough_runs_as_written(tiny_llama_dir, tmp_path, monkeypatch):
    blocks = walkthrough_blocks()
    assert [code for _, code in blocks if code.startswith("famserve serve")] == [blocks[0][1]] * 2  # start, restart
    book = write_book(tmp_path / "book.txt")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this python3
    monkeypatch.chdir(tmp_path)  # python blocks open book.txt where the shell blocks do
    namespace: dict = {}
    server: ReadmeServer | None = None
    starts = 0
    shell_outputs: list[tuple[int, str]] = []  # (server starts so far, output) per sh block
    python_outputs: list[str] = []
    try:
        for number, (language, code) in enumerate(blocks, 1):
            code = code.replace(README_URL, f"127.0.0.1:{port}")
            if language == "sh" and code.startswith("famserve serve"):
                before = None
                if server is not None:
                    before = all_sessions(server.url)
                    assert server.stop_with_ctrl_c() == 0, server.log_text()
                server = ReadmeServer(code.strip(), tmp_path, tiny_llama_dir, port, tmp_path / f"server-{number}.log")
                server.wait_ready()
                starts += 1
                if before is not None:
                    assert all_sessions(server.url) == before  # every session is exactly where it was
            elif language == "sh":
                output, env = run_sh(code, env, tmp_path)
                shell_outputs.append((starts, output))
            elif language == "python":
                stdout = io.StringIO()
                with contextlib.redirect_stdout(stdout):
                    exec(compile(code, f"README.md walkthrough block {number}", "exec"), namespace)
                python_outputs.append(stdout.getvalue())
            else:
                pytest.fail(f"README walkthrough block {number}: no runner for ```{language}")
        sessions = all_sessions(server.url)
    finally:
        if server is not None:
            server.stop()

    documents = [(start, d) for start, output in shell_outputs for d in json_documents(output)]
    assert [d for _, d in documents if "error" in d] == []
    ingested = [d for _, d in documents if d.get("object") == "session.append"][-1]
    assert ingested["tokens_appended"] == len(Tokenizer.from_hf_folder(tiny_llama_dir).encode(book))
    completions = [(start, d["choices"][0]["text"]) for start, d in documents if d.get("object") == "text_completion"]
    before, after = ([text for start, text in completions if start == n] for n in (1, 2))
    assert len(before) == 1 and after == before  # the same answer after the restart
    assert python_outputs[-1].splitlines()[0] == "1"
    assert namespace["third"].previous_response_id == namespace["second"].id
    assert len({s["state_bytes"] for s in sessions}) == 1 and len(sessions) == 5
