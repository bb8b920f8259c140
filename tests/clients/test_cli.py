"""`famserve-client` as a user runs it (a subprocess) against a real server: one-shot chat, a REPL fed from stdin,
completions, the session commands, ingest with its progress bar, and one-line errors with non-zero exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from client_helpers import API_KEY, MODEL_NAME, write_text_file
from server_process import free_port

from famserve.clients import FamserveClient

GREEDY = ["--max-tokens", "8", "--temperature", "0"]


def run_cli(*args: str, base_url: str | None = None, api_key: str | None = API_KEY, stdin: str = "",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAMSERVE_")}
    full_env.update(env or {})
    if base_url is not None:
        full_env["FAMSERVE_BASE_URL"] = base_url
    if api_key is not None:
        full_env["FAMSERVE_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "famserve.clients.cli", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=full_env, timeout=120)


def test_chat_one_shot_prints_the_reply(server, client: FamserveClient) -> None:
    result = run_cli("chat", "-m", "Hello there", *GREEDY, base_url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == client.chat("Hello there", max_tokens=8, temperature=0).text + "\n"


def test_chat_repl_keeps_the_conversation(server, client: FamserveClient) -> None:
    result = run_cli("chat", *GREEDY, base_url=server.url, stdin="first\nsecond\n")
    assert result.returncode == 0, result.stderr
    first = client.chat("first", max_tokens=8, temperature=0).text
    second = client.chat([{"role": "user", "content": "first"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "second"}], max_tokens=8, temperature=0).text
    assert result.stdout == f"{first}\n{second}\n"
    assert MODEL_NAME in result.stderr  # the banner


def test_chat_in_a_new_session(server, client: FamserveClient) -> None:
    result = run_cli("chat", "--new-session", "--system", "Be brief.", "-m", "Hi", *GREEDY, base_url=server.url)
    assert result.returncode == 0, result.stderr
    session_id = result.stderr.split("session ", 1)[1].split()[0]
    assert client.get_session(session_id).turns == 1
    again = run_cli("chat", "--session", session_id, "-m", "And now?", *GREEDY, base_url=server.url)
    assert again.returncode == 0, again.stderr
    assert client.get_session(session_id).turns == 2


def test_complete_from_stdin(server, client: FamserveClient) -> None:
    result = run_cli("complete", "-", *GREEDY, base_url=server.url, stdin="The quick brown fox")
    assert result.returncode == 0, result.stderr
    assert result.stdout == client.complete("The quick brown fox", max_tokens=8, temperature=0).text + "\n"


def test_chat_replies_in_json_that_follows_a_schema_file(server, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {
        "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer", "confidence"],
        "additionalProperties": False}
    (tmp_path / "verdict.json").write_text(json.dumps(schema))
    result = run_cli("chat", "-m", "Is it raining?", "--json-schema", str(tmp_path / "verdict.json"),
                     "--max-tokens", "60", "--temperature", "0.8", "--seed", "2", base_url=server.url)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert set(reply) == {"answer", "confidence"} and reply["answer"] in ("yes", "no")
    any_object = run_cli("complete", "A JSON object:", "--json", "--max-tokens", "60", "--seed", "1",
                         base_url=server.url)
    assert any_object.returncode == 0 and isinstance(json.loads(any_object.stdout), dict), any_object.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    refused = run_cli("chat", "-m", "hi", "--json-schema", str(tmp_path / "list.json"), base_url=server.url)
    assert refused.returncode == 2 and "holds no JSON object" in refused.stderr


def test_session_commands(server, tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        result = run_cli("sessions", *args, base_url=server.url)
        assert result.returncode == 0, result.stderr
        return result.stdout

    session_id = ok("create", "--system", "Be brief.", "--metadata", "project=cli").strip()
    assert session_id.startswith("sess_")
    listing = ok("list")
    assert listing.startswith("ID ") and session_id in listing and "project=cli" in listing
    assert json.loads(ok("show", session_id, "--json"))["metadata"] == {"project": "cli"}
    assert "tokens processed:" in ok("show", session_id)
    fork_id = ok("fork", session_id).strip()
    state_file = tmp_path / "state.safetensors"
    ok("export", session_id, str(state_file))
    imported_id = ok("import", str(state_file)).strip()
    listed = [json.loads(line)["id"] for line in ok("list", "--json").splitlines()]
    assert {session_id, fork_id, imported_id} <= set(listed)
    for each in (session_id, fork_id, imported_id):
        ok("delete", each)
    assert session_id not in ok("list")


def test_ingest_shows_a_progress_bar(server, client: FamserveClient, tmp_path: Path, count_tokens) -> None:
    text_file = write_text_file(tmp_path / "notes.txt", 12_000)
    result = run_cli("ingest", str(text_file), "--new", "--part-bytes", "4000", base_url=server.url)
    assert result.returncode == 0, result.stderr
    session_id = result.stdout.strip()
    tokens = count_tokens(text_file.read_text())
    assert client.get_session(session_id).tokens_processed == tokens
    assert "tokens/s" in result.stderr and f"{tokens:,} tokens" in result.stderr  # the bar's last state
    assert f"ingested {text_file.stat().st_size:,} bytes as {tokens:,} tokens" in result.stderr


def test_the_flag_wins_over_the_environment(server) -> None:
    result = run_cli("--api-key", API_KEY, "models", base_url=server.url, env={"FAMSERVE_API_KEY": "wrong"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{MODEL_NAME}\tbswa")


@pytest.mark.parametrize("args, api_key, message", [
    (["models"], "wrong", "famserve-client: 401 invalid_api_key: invalid API key\n"),
    (["sessions", "show", "sess_unknown"], API_KEY, "famserve-client: 404 "),
    (["chat", "-m", "hi", "--temperature", "5"], API_KEY, "famserve-client: 400 invalid_value: temperature: "),
    (["ingest", "/no/such/file.txt", "--new"], API_KEY, "famserve-client: /no/such/file.txt: No such file"),
])
def test_errors_are_one_line_and_exit_1(server, args: list[str], api_key: str, message: str) -> None:
    result = run_cli(*args, base_url=server.url, api_key=api_key)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_no_server_exits_1_without_a_traceback() -> None:
    result = run_cli("models", base_url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "Connection refused" in result.stderr and "Traceback" not in result.stderr


def test_bad_usage_exits_2() -> None:
    result = run_cli("chat", "--session", "sess_x", "--system", "hi", "-m", "x")
    assert result.returncode == 2 and result.stderr.startswith("famserve-client: --system starts a conversation")
    assert run_cli("ingest", "file.txt").returncode == 2  # --session or --new is required (argparse)


def test_the_console_script_runs() -> None:
    script = Path(sys.executable).with_name("famserve-client")  # installed beside this interpreter (the venv's)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "sessions" in result.stdout
