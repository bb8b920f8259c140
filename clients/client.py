"""FamserveClient: a synchronous Python client (httpx) for famserve's HTTP API — the OpenAI routes (chat,
completions, models) and the session extension (persistent FAM streams: append, ingest a file, chat, fork, export,
import). It speaks only HTTP; nothing here imports the server or the engine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0  # a long prompt on a CPU server can take minutes before the first byte
INGEST_CHUNK_BYTES = 1 << 16  # the file is read and sent in pieces of this size (and progress reported per piece)
# One append request per part of this size. httpx sends a whole body before it reads the answer, so the server's
# progress events for a part wait in socket buffers until the part is sent: parts keep them few (and bound how
# stale the token count is while a part uploads).
INGEST_PART_BYTES = 1 << 20


class FamserveError(Exception):
    """Anything that went wrong talking to the server."""


class FamserveConnectionError(FamserveError):
    """The server could not be reached, or the connection failed or timed out."""


class FamserveAPIError(FamserveError):
    """An OpenAI-shaped error answer. `status` is the HTTP status, or None for an error event inside a stream that
    had already begun."""

    def __init__(self, status: int | None, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        kind = self.code or self.type or "error"
        return f"{where}{kind}: {self.message}"

    @classmethod
    def from_body(cls, status: int | None, body: Any) -> FamserveAPIError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, f"unexpected answer: {str(body)[:200]}")
        return cls(status, str(error.get("message", "")), error.get("type"), error.get("code"), error.get("param"))


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server describes it (SessionInfo); `fam` holds mode, block_size, memory_blocks,
    fam_length, sink_tokens and fam_after_window."""

    id: str
    model: str
    created_at: int  # unix seconds
    last_used_at: int  # unix seconds
    tokens_processed: int  # tokens the stream has consumed, ever
    state_bytes: int  # size of the state; it does not grow with tokens_processed
    blocks: int
    turns: int
    metadata: dict[str, str]
    fam: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionInfo:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Completion:
    """A finished (non-streamed) chat reply or completion."""

    text: str
    finish_reason: str | None
    usage: dict[str, int] | None
    mode: str | None  # the attention mode in use (the response's `famserve.mode`)
    raw: dict[str, Any]


@dataclass(frozen=True)
class IngestProgress:
    """Where an ingest stands: bytes of the file sent, tokens the session has consumed from it so far."""

    bytes_sent: int
    total_bytes: int
    tokens_appended: int
    elapsed_s: float
    session: SessionInfo  # as the latest progress event (or, before the first, the ingest's start) left it


@dataclass
class TextStream:
    """A streamed chat reply or completion: an iterator of text deltas; afterwards `finish_reason`, `usage`, `mode`
    and `id` are set. Use it as a context manager (or call close()) to drop the connection early, which cancels
    the generation on the server."""

    _events: Iterator[dict[str, Any]]
    _close: Callable[[], None]
    id: str | None = None
    mode: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    text: str = field(default="")  # everything received so far

    def __post_init__(self) -> None:
        self._deltas = self._read()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def _read(self) -> Iterator[str]:
        try:
            for chunk in self._events:
                self.id = self.id or chunk.get("id")
                self.mode = self.mode or (chunk.get("famserve") or {}).get("mode")
                self.usage = chunk.get("usage") or self.usage
                for choice in chunk.get("choices") or []:
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if delta:
                        self.text += delta
                        yield delta
        finally:
            self.close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Messages = str | list[dict[str, Any]]


class FamserveClient:
    """famserve's API over HTTP. `api_key` is sent as `Authorization: Bearer <key>`; `model` defaults to the first
    one /v1/models lists. Errors raise FamserveAPIError (the server said no) or FamserveConnectionError."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, model: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        self._model = model

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FamserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- OpenAI routes -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def ready(self) -> dict[str, Any]:
        """The /ready answer ({"status", "model", "famserve": {"mode"}}); FamserveAPIError 503 while loading."""
        return self._json("GET", "/ready")

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["data"]

    @property
    def model(self) -> str:
        """The model requests name: the one given to the constructor, else the first the server lists."""
        if self._model is None:
            self._model = self.models()[0]["id"]
        return self._model

    def chat(self, messages: Messages, *, stream: bool = False, **params: Any) -> Completion | TextStream:
        """A chat reply to `messages` (a list of {"role", "content"}, or one user message as a string). Extra
        keyword arguments are request fields (max_tokens, temperature, stop, seed, top_k, ...)."""
        body = {"model": params.pop("model", None) or self.model, "messages": _messages(messages), **params}
        return self._generate("/v1/chat/completions", body, stream)

    def complete(self, prompt: str | list[int], *, stream: bool = False, **params: Any) -> Completion | TextStream:
        """A text completion of `prompt` (a string or token ids)."""
        body = {"model": params.pop("model", None) or self.model, "prompt": prompt, **params}
        return self._generate("/v1/completions", body, stream)

    # --- sessions ------------------------------------------------------------------------------------------------

    def create_session(self, system_prompt: str | None = None,
                       metadata: dict[str, str] | None = None) -> SessionInfo:
        body = {key: value for key, value in (("system_prompt", system_prompt), ("metadata", metadata)) if value}
        return SessionInfo.from_json(self._json("POST", "/v1/sessions", json=body))

    def list_sessions(self, page_size: int = 100) -> Iterator[SessionInfo]:
        """Every session of this API key, oldest first (fetched page by page as the iteration goes)."""
        after: str | None = None
        while True:
            params = {"limit": page_size, **({"after": after} if after else {})}
            page = self._json("GET", "/v1/sessions", params=params)
            yield from (SessionInfo.from_json(item) for item in page["data"])
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    def get_session(self, session_id: str) -> SessionInfo:
        return SessionInfo.from_json(self._json("GET", f"/v1/sessions/{_quote(session_id)}"))

    def delete_session(self, session_id: str) -> None:
        self._json("DELETE", f"/v1/sessions/{_quote(session_id)}")

    def fork(self, session_id: str) -> SessionInfo:
        """A new session holding a copy of this one's state."""
        return SessionInfo.from_json(self._json("POST", f"/v1/sessions/{_quote(session_id)}/fork"))

    def append_text(self, session_id: str, text: str) -> SessionInfo:
        """Let the session consume `text` (nothing is generated); returns the session afterwards."""
        return self._append(session_id, {"text": text})

    def append_tokens(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        return self._append(session_id, {"token_ids": token_ids})

    def ingest_file(self, session_id: str, path: str | Path, *, chunk_bytes: int = INGEST_CHUNK_BYTES,
                    part_bytes: int = INGEST_PART_BYTES,
                    on_progress: Callable[[IngestProgress], None] | None = None) -> SessionInfo:
        """Let the session consume a UTF-8 text file of any size. The file is streamed as text/plain bodies (never
        held in memory whole), one append request per `part_bytes`, cut at a line break; `on_progress` is called
        as bytes go out and as the server reports tokens consumed. Returns the session afterwards. If it fails
        midway, the session keeps what it consumed until then (see its tokens_processed)."""
        path = Path(path)
        total = path.stat().st_size
        latest = self.get_session(session_id)  # what progress reports carry until the server's first event
        started = time.monotonic()
        sent = tokens_before = 0

        def report(tokens: int) -> None:
            if on_progress is not None:
                on_progress(IngestProgress(sent, total, tokens, time.monotonic() - started, latest))

        def body(part: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal sent
            for chunk in part:
                sent += len(chunk)
                yield chunk
                report(tokens_before)

        with path.open("rb") as file:
            for part in _file_parts(file, chunk_bytes, part_bytes):
                url = f"/v1/sessions/{_quote(session_id)}/append"
                with self._stream("POST", url, params={"stream": "true"}, content=body(part),
                                  headers={"Content-Type": "text/plain; charset=utf-8"}) as response:
                    appended = 0
                    for event in _sse_events(response):
                        appended = event["tokens_appended"]
                        latest = SessionInfo.from_json(event["session"])
                        report(tokens_before + appended)
                tokens_before += appended
        report(tokens_before)
        return latest

    def session_chat(self, session_id: str, messages: Messages, *, stream: bool = False,
                     **params: Any) -> Completion | TextStream:
        """One chat turn inside a session: send only the new messages (a string is one user message); the
        session already holds the conversation so far, and keeps the reply."""
        body = {"messages": _messages(messages), **params}
        return self._generate(f"/v1/sessions/{_quote(session_id)}/chat/completions", body, stream)

    def session_complete(self, session_id: str, prompt: str | list[int], *, commit: bool = True,
                         stream: bool = False, **params: Any) -> Completion | TextStream:
        """Continue the session's stream with `prompt`; with commit=False the session is left as it was."""
        body = {"prompt": prompt, "commit": commit, **params}
        return self._generate(f"/v1/sessions/{_quote(session_id)}/completions", body, stream)

    def export_state(self, session_id: str, path: str | Path) -> int:
        """Write the session's state (a safetensors snapshot) to `path`; returns the bytes written."""
        written = 0
        url = f"/v1/sessions/{_quote(session_id)}/state"
        with self._stream("GET", url) as response, Path(path).open("wb") as file:
            for chunk in response.iter_bytes():
                written += file.write(chunk)
        return written

    def import_state(self, path: str | Path) -> SessionInfo:
        """A new session from a file written by export_state (same model and attention settings)."""
        data = Path(path).read_bytes()
        return SessionInfo.from_json(self._json("POST", "/v1/sessions/import", content=data,
                                                headers={"Content-Type": "application/octet-stream"}))

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _append(self, session_id: str, body: dict[str, Any]) -> SessionInfo:
        answer = self._json("POST", f"/v1/sessions/{_quote(session_id)}/append", json=body)
        return SessionInfo.from_json(answer["session"])

    def _generate(self, path: str, body: dict[str, Any], stream: bool) -> Completion | TextStream:
        if not stream:
            return _completion(self._json("POST", path, json=body))
        request = self._http.build_request("POST", path, json={**body, "stream": True})
        response = self._send(request, stream=True)
        return TextStream(_sse_events(response), response.close)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(self._http.build_request(method, path, **kwargs))
        return response.json()

    def _stream(self, method: str, path: str, **kwargs: Any) -> closing[httpx.Response]:
        return closing(self._send(self._http.build_request(method, path, **kwargs), stream=True))

    def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            raise FamserveConnectionError(f"{request.url}: timed out ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            raise FamserveConnectionError(f"cannot connect to {request.url}: {e or type(e).__name__}") from None
        except httpx.TransportError as e:
            raise FamserveConnectionError(f"{request.url}: {e or type(e).__name__}") from None
        if response.is_error:
            raise _api_error(response)
        return response


def _api_error(response: httpx.Response) -> FamserveAPIError:
    """The error an error answer carries; one that is not OpenAI-shaped JSON (a proxy's page) says what it was."""
    try:
        response.read()
    except httpx.HTTPError:
        return FamserveAPIError(response.status_code, response.reason_phrase)
    finally:
        response.close()
    try:
        return FamserveAPIError.from_body(response.status_code, response.json())
    except ValueError:
        return FamserveAPIError(response.status_code, f"{response.reason_phrase}: {response.text[:200]!r}")


def _quote(session_id: str) -> str:
    """A session id as one URL path segment (an id is never allowed to reach another route)."""
    return quote(session_id, safe="")


def _messages(messages: Messages) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _completion(data: dict[str, Any]) -> Completion:
    choice = data["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return Completion(text or "", choice.get("finish_reason"), data.get("usage"),
                      (data.get("famserve") or {}).get("mode"), data)


def _sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream up to `data: [DONE]`; an error event raises
    FamserveAPIError; SSE comments (`: ping`) are skipped. Closes the response at the end."""
    try:
        data: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise FamserveAPIError.from_body(None, event)
                yield event
    except httpx.TransportError as e:
        raise FamserveConnectionError(f"{response.url}: the stream broke off ({e or type(e).__name__})") from None
    finally:
        response.close()


def _file_parts(file: BinaryIO, chunk_bytes: int, part_bytes: int) -> Iterator[Iterator[bytes]]:
    """Split a file into parts of about part_bytes, each an iterator of chunks of at most chunk_bytes. A part ends
    at a line break between two visible characters where there is one, else at any line break, else between two
    UTF-8 characters (so every part is valid text, tokenized as it would be whole). Consume each part fully before
    asking for the next."""
    if chunk_bytes < 1 or part_bytes < 1:
        raise ValueError("chunk_bytes and part_bytes must be positive")
    carry = b""
    while True:
        first = carry or file.read(chunk_bytes)
        if not first:
            return
        carry = b""

        def part(first: bytes = first) -> Iterator[bytes]:
            nonlocal carry
            chunk, size = first, 0
            while chunk:
                if size + len(chunk) >= part_bytes:
                    cut = _cut_point(chunk)
                    if 0 < cut < len(chunk):
                        carry = chunk[cut:]
                        yield chunk[:cut]
                        return
                yield chunk
                size += len(chunk)
                chunk = file.read(chunk_bytes)

        yield part()


def _cut_point(chunk: bytes) -> int:
    """Where to end a part inside `chunk` (see _file_parts); 0 when nowhere."""
    newline = chunk.rfind(b"\n")
    any_newline = newline
    while newline > 0:  # the last line break between two visible characters
        if newline + 1 < len(chunk) and not chunk[newline - 1:newline].isspace() \
                and not chunk[newline + 1:newline + 2].isspace():
            return newline + 1
        newline = chunk.rfind(b"\n", 0, newline)
    if any_newline >= 0:
        return any_newline + 1
    cut = len(chunk) - 1
    while cut > 0 and chunk[cut] & 0xC0 == 0x80:  # back off UTF-8 continuation bytes
        cut -= 1
    return cut
