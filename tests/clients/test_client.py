"""FamserveClient against a real server process: the OpenAI routes, every session call, file ingestion with
progress, and errors raised as FamserveAPIError / FamserveConnectionError with the server's status and code."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from famserve.clients import (Completion, FamserveAPIError, FamserveClient, FamserveConnectionError, IngestProgress,
                              TextStream)

from client_helpers import API_KEY, MODEL_NAME, write_text_file
from server_process import free_port

GREEDY = {"max_tokens": 8, "temperature": 0}


def test_health_ready_models(client: FamserveClient) -> None:
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready["model"] == MODEL_NAME and ready["famserve"]["mode"] == "bswa (L=8 M=1 S=4)"
    assert [model["id"] for model in client.models()] == [MODEL_NAME]
    assert client.model == MODEL_NAME  # the default model is the served one


def test_chat_plain_and_streamed_agree(client: FamserveClient) -> None:
    reply = client.chat("Hello there", **GREEDY)
    assert isinstance(reply, Completion)
    assert reply.finish_reason == "length" and reply.usage["completion_tokens"] == 8
    assert reply.mode == "bswa (L=8 M=1 S=4)"
    with client.chat([{"role": "user", "content": "Hello there"}], stream=True, **GREEDY,
                     stream_options={"include_usage": True}) as stream:
        assert isinstance(stream, TextStream)
        deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == stream.text == reply.text
    assert (stream.finish_reason, stream.usage, stream.mode) == ("length", reply.usage, reply.mode)


def test_complete_plain_and_streamed_agree(client: FamserveClient) -> None:
    reply = client.complete("The quick brown fox", **GREEDY)
    assert reply.usage["completion_tokens"] == 8
    assert "".join(client.complete("The quick brown fox", stream=True, **GREEDY)) == reply.text


def test_closing_a_stream_early_drops_it(client: FamserveClient) -> None:
    with client.chat("Tell me a story", stream=True, max_tokens=64) as stream:
        first = next(iter(stream))
    assert first and stream.finish_reason is None
    assert client.chat("still answering?", **GREEDY).finish_reason == "length"


def test_session_lifecycle(client: FamserveClient, tmp_path: Path) -> None:
    created = client.create_session("You answer briefly.", {"doc": "test"})
    assert created.id.startswith("sess_") and created.metadata == {"doc": "test"}
    assert created.tokens_processed > 0 and created.turns == 0 and created.fam["block_size"] == 8
    assert created.id in [session.id for session in client.list_sessions(page_size=1)]  # paged one by one

    appended = client.append_text(created.id, "The pass key is 4217.")
    assert appended.tokens_processed > created.tokens_processed
    reply = client.session_chat(created.id, "What is the pass key?", **GREEDY)
    assert reply.usage["completion_tokens"] == 8
    with client.session_chat(created.id, [{"role": "user", "content": "Again?"}], stream=True, **GREEDY) as stream:
        assert "".join(stream) == stream.text and stream.finish_reason == "length"
    after_chat = client.get_session(created.id)
    assert after_chat.turns == 2 and after_chat.tokens_processed > appended.tokens_processed
    assert after_chat.state_bytes == created.state_bytes  # fixed size, whatever the history

    dry = client.session_complete(created.id, " Q:", commit=False, **GREEDY)
    assert client.get_session(created.id).tokens_processed == after_chat.tokens_processed
    fork = client.fork(created.id)
    assert fork.id != created.id and fork.tokens_processed == after_chat.tokens_processed
    assert client.session_complete(fork.id, " Q:", commit=False, **GREEDY).text == dry.text

    path = tmp_path / "state.safetensors"
    assert client.export_state(created.id, path) == path.stat().st_size > 0
    imported = client.import_state(path)
    assert imported.id not in (created.id, fork.id) and imported.tokens_processed == after_chat.tokens_processed
    assert client.session_complete(imported.id, " Q:", commit=False, **GREEDY).text == dry.text

    committed = client.session_complete(created.id, " Q:", stream=True, **GREEDY)
    assert "".join(committed) == dry.text
    assert client.get_session(created.id).tokens_processed > after_chat.tokens_processed
    for session_id in (created.id, fork.id, imported.id):
        client.delete_session(session_id)
    with pytest.raises(FamserveAPIError) as error:
        client.get_session(created.id)
    assert error.value.status == 404


@pytest.mark.parametrize("stream", [False, True])
def test_a_committed_completion_keeps_every_token(client: FamserveClient, count_tokens, stream: bool) -> None:
    session = client.create_session()
    for _ in range(3):  # the tiny random model soon emits a token that is half a character
        before = client.get_session(session.id).tokens_processed
        reply = client.session_complete(session.id, " Q:", stream=stream, **GREEDY)
        if stream:
            list(reply)  # read to its end
        grown = client.get_session(session.id).tokens_processed - before
        assert grown == count_tokens(" Q:") + GREEDY["max_tokens"]  # the prompt and every generated token


def test_ingest_file_in_parts_with_progress(client: FamserveClient, tmp_path: Path, count_tokens) -> None:
    text_file = write_text_file(tmp_path / "notes.txt", 24_000)
    session = client.create_session()
    updates: list[IngestProgress] = []
    done = client.ingest_file(session.id, text_file, chunk_bytes=2048, part_bytes=6000, on_progress=updates.append)
    expected_tokens = count_tokens(text_file.read_text())
    assert done.tokens_processed == session.tokens_processed + expected_tokens  # parts cut where tokens agree
    assert [u.bytes_sent for u in updates] == sorted(u.bytes_sent for u in updates)
    assert [u.tokens_appended for u in updates] == sorted(u.tokens_appended for u in updates)
    assert len({u.tokens_appended for u in updates}) > 4  # several parts, several events
    assert (updates[-1].bytes_sent, updates[-1].total_bytes) == (text_file.stat().st_size,) * 2
    assert updates[-1].tokens_appended == expected_tokens and updates[-1].session == done


@pytest.mark.slow
def test_ingest_multi_megabyte_file_streams_it(start_client_server, tmp_path: Path, count_tokens) -> None:
    """A 2 MiB file goes through without the client holding it (a server with larger blocks keeps this ~1 min)."""
    server = start_client_server(block_size=256)
    text_file = write_text_file(tmp_path / "book.txt", 2 << 20)
    updates: list[IngestProgress] = []
    with FamserveClient(server.url, api_key=API_KEY, timeout_s=300) as client:
        session = client.create_session()
        tracemalloc.start()
        done = client.ingest_file(session.id, text_file, chunk_bytes=1 << 16, part_bytes=1 << 19,
                                  on_progress=updates.append)
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak_bytes < (1 << 20)  # well under the file's 2 MiB
    assert done.tokens_processed == count_tokens(text_file.read_text())
    assert [u.tokens_appended for u in updates] == sorted(u.tokens_appended for u in updates)
    assert updates[-1].bytes_sent == text_file.stat().st_size


@pytest.mark.parametrize("call, status, code, param", [
    (lambda c: c.chat("hi", temperature=5), 400, "invalid_value", "temperature"),
    (lambda c: c.chat("hi", model="no-such-model"), 404, "model_not_found", "model"),
    (lambda c: c.get_session("sess_unknown"), 404, "session_not_found", None),
    (lambda c: c.session_chat("sess_unknown", "hi"), 404, "session_not_found", None),
    (lambda c: c.ingest_file("sess_unknown", __file__), 404, "session_not_found", None),
    (lambda c: c.fork("sess_unknown"), 404, "session_not_found", None),
])
def test_errors_carry_status_and_code(client: FamserveClient, call, status: int, code: str, param: str | None) -> None:
    with pytest.raises(FamserveAPIError) as error:
        call(client)
    assert (error.value.status, error.value.code, error.value.param) == (status, code, param)
    assert str(error.value).startswith(f"{status} {code}: ")


@pytest.mark.parametrize("api_key, code", [(None, "missing_api_key"), ("wrong-key", "invalid_api_key")])
def test_a_missing_or_wrong_key_is_401(server, api_key: str | None, code: str) -> None:
    with FamserveClient(server.url, api_key=api_key) as client:
        assert client.health() == {"status": "ok"}  # open to probes
        with pytest.raises(FamserveAPIError) as error:
            client.models()
    assert (error.value.status, error.value.type, error.value.code) == (401, "authentication_error", code)


def test_no_server_is_a_connection_error() -> None:
    with FamserveClient(f"http://127.0.0.1:{free_port()}", timeout_s=5) as client:
        with pytest.raises(FamserveConnectionError, match="Connection refused"):
            client.models()
