"""`famserve-client`: chat (a REPL, or one message), completions, session management and file ingestion with a
progress bar, against a famserve server. --base-url and --api-key default to FAMSERVE_BASE_URL and FAMSERVE_API_KEY
(a flag wins). Errors are one line on stderr and a non-zero exit: 1 when the server or the connection failed, 2 for
bad usage, 130 when interrupted."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from .client import (DEFAULT_BASE_URL, DEFAULT_TIMEOUT_S, INGEST_PART_BYTES, FamserveClient, FamserveError,
                     IngestProgress)

PROG = "famserve-client"
QUIT_COMMANDS = frozenset({"/exit", "/quit"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]  # a model may emit what a console can't show
    try:
        with FamserveClient(args.base_url, args.api_key, args.timeout_s) as client:
            return args.run(client, args) or 0
    except FamserveError as e:
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a file to ingest, export or import
        print(f"{PROG}: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


class UsageError(Exception):
    """Options that do not go together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Talk to a famserve server.")
    parser.add_argument("--base-url", default=os.environ.get("FAMSERVE_BASE_URL", DEFAULT_BASE_URL),
                        help="server URL (env FAMSERVE_BASE_URL; default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("FAMSERVE_API_KEY"),
                        help="API key sent as a bearer token (env FAMSERVE_API_KEY)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for the server (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat: a REPL, or one --message")
    chat.add_argument("-m", "--message", help="send this one message, print the reply and exit")
    where = chat.add_mutually_exclusive_group()
    where.add_argument("--session", metavar="ID", help="chat inside this session (it keeps the conversation)")
    where.add_argument("--new-session", action="store_true", help="create a session and chat inside it")
    chat.add_argument("--system", help="system prompt of a new conversation")
    _generation_options(chat)
    chat.set_defaults(run=run_chat)

    complete = commands.add_parser("complete", help="complete a prompt ('-' reads it from stdin)")
    complete.add_argument("prompt")
    complete.add_argument("--session", metavar="ID", help="continue this session's stream")
    complete.add_argument("--no-commit", dest="commit", action="store_false",
                          help="with --session: leave the session as it was")
    _generation_options(complete)
    complete.set_defaults(run=run_complete)

    ingest = commands.add_parser("ingest", help="let a session consume a text file, with a progress bar")
    ingest.add_argument("file")
    target = ingest.add_mutually_exclusive_group(required=True)
    target.add_argument("--session", metavar="ID", help="the session to feed")
    target.add_argument("--new", action="store_true", help="create a session for it (its id is printed)")
    ingest.add_argument("--part-bytes", type=int, default=INGEST_PART_BYTES, help="bytes per append request")
    ingest.set_defaults(run=run_ingest)

    commands.add_parser("models", help="list the served models").set_defaults(run=run_models)
    _session_commands(commands.add_parser("sessions", help="list, create, show, delete, fork, export, import"))
    return parser


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (default: the one the server serves)")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="reply with a JSON object (structured output)")
    shape.add_argument("--json-schema", metavar="FILE", help="reply with JSON that follows this JSON schema file")


def _session_commands(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="your sessions, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=run_sessions_list)
    create = actions.add_parser("create", help="create a session; prints its id")
    create.add_argument("--system", help="system prompt the session starts with")
    create.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    create.set_defaults(run=lambda client, args: print(client.create_session(args.system, _pairs(args.metadata)).id))
    show = actions.add_parser("show", help="a session's details")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=run_sessions_show)
    delete = actions.add_parser("delete", help="delete a session")
    delete.add_argument("id")
    delete.set_defaults(run=run_sessions_delete)
    fork = actions.add_parser("fork", help="copy a session; prints the new id")
    fork.add_argument("id")
    fork.set_defaults(run=lambda client, args: print(client.fork(args.id).id))
    export = actions.add_parser("export", help="save a session's state to a file")
    export.add_argument("id")
    export.add_argument("file")
    export.set_defaults(run=run_sessions_export)
    load = actions.add_parser("import", help="a new session from an exported file; prints its id")
    load.add_argument("file")
    load.set_defaults(run=lambda client, args: print(client.import_state(args.file).id))


# --- commands --------------------------------------------------------------------------------------------------------

def run_chat(client: FamserveClient, args: argparse.Namespace) -> None:
    if args.system and args.session:
        raise UsageError("--system starts a conversation; session " + args.session + " already has one")
    session_id = args.session
    if args.new_session:
        session_id = client.create_session(args.system).id
        print(f"session {session_id}", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system and not session_id else []
    params = _generation_params(args)
    if args.message is not None:
        _chat_turn(client, session_id, history, args.message, params)
        return
    mode = client.ready().get("famserve", {}).get("mode")
    print(f"{client.model} ({mode}); {'/exit or ' if sys.stdin.isatty() else ''}end of input to leave",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip() in QUIT_COMMANDS:
            return
        if line.strip():
            _chat_turn(client, session_id, history, line, params)


def _chat_turn(client: FamserveClient, session_id: str | None, history: list[dict[str, Any]], message: str,
               params: dict[str, Any]) -> None:
    """Send one user message and print the reply as it streams. Without a session the history is kept here."""
    if session_id is not None:
        stream = client.session_chat(session_id, message, stream=True, **params)
    else:
        history.append({"role": "user", "content": message})
        stream = client.chat(history, stream=True, **params)
    try:
        for text in stream:
            sys.stdout.write(text)
            sys.stdout.flush()
    except BaseException:
        if session_id is None:
            history.pop()  # the turn did not happen
        raise
    print()
    if session_id is None:
        history.append({"role": "assistant", "content": stream.text})


def run_complete(client: FamserveClient, args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _generation_params(args)
    if args.session:
        stream = client.session_complete(args.session, prompt, commit=args.commit, stream=True, **params)
    elif not args.commit:
        raise UsageError("--no-commit goes with --session")
    else:
        stream = client.complete(prompt, stream=True, **params)
    for text in stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    print()


def run_models(client: FamserveClient, args: argparse.Namespace) -> None:
    for model in client.models():
        print(f"{model['id']}\t{model.get('famserve', {}).get('mode', '')}")


def run_ingest(client: FamserveClient, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
        TransferSpeedColumn

    size = os.path.getsize(args.file)  # a missing file fails before a session is created for it
    session_id = client.create_session().id if args.new else args.session
    if args.new:
        print(session_id)
    columns = (TextColumn("ingest"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]:,.0f} tokens/s"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("ingest", total=size, tokens=0, rate=0.0)

        def show(progress: IngestProgress) -> None:
            rate = progress.tokens_appended / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
            bar.update(task, completed=progress.bytes_sent, tokens=progress.tokens_appended, rate=rate)

        started = time.monotonic()
        before = client.get_session(session_id).tokens_processed
        session = client.ingest_file(session_id, args.file, part_bytes=args.part_bytes, on_progress=show)
    elapsed_s = time.monotonic() - started
    tokens = session.tokens_processed - before
    print(f"ingested {size:,} bytes as {tokens:,} tokens in {elapsed_s:.1f} s ({tokens / elapsed_s:,.0f} tokens/s); "
          f"session {session.id} has processed {session.tokens_processed:,} tokens", file=sys.stderr)


def run_sessions_list(client: FamserveClient, args: argparse.Namespace) -> None:
    sessions = list(client.list_sessions())
    if args.json:
        for session in sessions:
            print(json.dumps(asdict(session)))
        return
    if not sessions:
        print("no sessions", file=sys.stderr)
        return
    print(f"{'ID':<36}  {'TOKENS':>12}  {'STATE':>10}  {'TURNS':>5}  {'LAST USED':<19}  METADATA")
    for s in sessions:
        metadata = ",".join(f"{key}={value}" for key, value in s.metadata.items())
        print(f"{s.id:<36}  {s.tokens_processed:>12,}  {_bytes(s.state_bytes):>10}  {s.turns:>5}  "
              f"{_time(s.last_used_at):<19}  {metadata}")


def run_sessions_show(client: FamserveClient, args: argparse.Namespace) -> None:
    session = client.get_session(args.id)
    if args.json:
        print(json.dumps(asdict(session), indent=2))
        return
    fam = session.fam
    rows = [("id", session.id), ("model", session.model), ("mode", fam.get("mode")),
            ("tokens processed", f"{session.tokens_processed:,}"), ("blocks", f"{session.blocks:,}"),
            ("turns", session.turns), ("state", f"{_bytes(session.state_bytes)} ({session.state_bytes:,} bytes)"),
            ("fam", ", ".join(f"{key}={value}" for key, value in fam.items() if key != "mode")),
            ("created", _time(session.created_at)), ("last used", _time(session.last_used_at)),
            *((f"metadata.{key}", value) for key, value in session.metadata.items())]
    for name, value in rows:
        print(f"{name + ':':<18} {value}")


def run_sessions_delete(client: FamserveClient, args: argparse.Namespace) -> None:
    client.delete_session(args.id)
    print(f"deleted {args.id}", file=sys.stderr)


def run_sessions_export(client: FamserveClient, args: argparse.Namespace) -> None:
    written = client.export_state(args.id, args.file)
    print(f"wrote {written:,} bytes to {args.file}", file=sys.stderr)


# --- helpers ---------------------------------------------------------------------------------------------------------

def _generation_params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "max_tokens", "temperature", "seed")
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.json:
        params["response_format"] = {"type": "json_object"}
    elif args.json_schema:
        params["response_format"] = {"type": "json_schema", "json_schema": {
            "name": re.sub(r"[^A-Za-z0-9_-]", "_", Path(args.json_schema).stem)[:64] or "schema",
            "schema": _read_schema(args.json_schema)}}
    return params


def _read_schema(path: str) -> dict[str, Any]:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"--json-schema: {path} is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema: {path} holds no JSON object")
    return schema


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata: expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _time(unix_s: int) -> str:
    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
