"""SessionStore: durable storage of sessions — a record (JSON), the latest state snapshot, and an append-only log of
the token ids consumed since that snapshot — with a FileStore (default) and a RedisStore (shared by replicas).

Recovery is snapshot + replay of the log. Log entries carry the stream offset they start at, so a crash between
writing a new snapshot and trimming the log never replays a token twice. Every log entry and snapshot is checksummed;
a mismatch raises SessionCorruptError and nothing is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from famserve.engine.errors import FamserveError

_ENTRY_HEADER = struct.Struct("<QII")  # start offset, token count, crc32 of the token bytes


class SessionCorruptError(FamserveError):
    """A stored snapshot or log failed its checksum or could not be parsed; the session is not loaded."""


@dataclass
class SessionRecord:
    """What a session is, apart from its tensors. Small; rewritten atomically on every mutation."""

    id: str
    owner: str  # hash of the API key that created it ("anonymous" without keys)
    model_id: str
    fam_config: dict
    created_at: float
    last_used_at: float
    metadata: dict = field(default_factory=dict)
    anchor_messages: list = field(default_factory=list)  # the chat template's rendering context (see sessions.py)
    tokens_processed: int = 0
    turns: int = 0
    version: int = 0  # +1 per committed mutation; replicas compare it to know their hot copy is current
    snapshot_tokens: int = -1  # num_tokens of the stored snapshot; -1 = none yet
    snapshot_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "SessionRecord":
        return cls(**json.loads(text))


def pack_entry(start: int, token_ids: list[int]) -> bytes:
    body = struct.pack(f"<{len(token_ids)}i", *token_ids)
    return _ENTRY_HEADER.pack(start, len(token_ids), zlib.crc32(body)) + body


def unpack_entries(data: bytes, source: str) -> list[tuple[int, list[int]]]:
    """Parse concatenated log entries. A torn final entry (a crash mid-write, never acknowledged) is dropped; a
    checksum mismatch anywhere is corruption."""
    out, pos = [], 0
    while pos < len(data):
        if pos + _ENTRY_HEADER.size > len(data):
            break  # torn header
        start, n, crc = _ENTRY_HEADER.unpack_from(data, pos)
        end = pos + _ENTRY_HEADER.size + 4 * n
        if end > len(data):
            break  # torn body
        body = data[pos + _ENTRY_HEADER.size:end]
        if zlib.crc32(body) != crc:
            raise SessionCorruptError(f"{source}: log entry at byte {pos} fails its checksum")
        out.append((start, list(struct.unpack(f"<{n}i", body))))
        pos = end
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SessionStore(ABC):
    @abstractmethod
    def save_record(self, record: SessionRecord) -> None: ...

    @abstractmethod
    def load_record(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    def list_records(self, owner: str) -> list[SessionRecord]: ...

    @abstractmethod
    def append_log(self, session_id: str, start: int, token_ids: list[int]) -> None:
        """Durably record tokens consumed from stream offset `start`; returns only once they would survive a crash."""

    @abstractmethod
    def _read_log_bytes(self, session_id: str) -> bytes: ...

    @abstractmethod
    def write_snapshot(self, record: SessionRecord, data: bytes) -> None:
        """Store a snapshot taken at record.tokens_processed, point the record at it and trim the log."""

    @abstractmethod
    def _read_snapshot_bytes(self, record: SessionRecord) -> bytes | None: ...

    @abstractmethod
    def delete(self, session_id: str) -> None: ...

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> bool:
        """Exclusive right to mutate a session across replicas; a single-process store always grants it."""
        return True

    def release_lease(self, session_id: str, holder: str) -> None:
        return None

    def read_snapshot(self, record: SessionRecord) -> bytes | None:
        if record.snapshot_tokens < 0:
            return None
        data = self._read_snapshot_bytes(record)
        if data is None:
            raise SessionCorruptError(f"session {record.id}: snapshot at {record.snapshot_tokens} tokens is missing")
        if sha256(data) != record.snapshot_sha256:
            raise SessionCorruptError(f"session {record.id}: snapshot fails its checksum")
        return data

    def read_log(self, record: SessionRecord) -> list[int]:
        """Token ids consumed after the snapshot, in order, verified to be contiguous."""
        pos = max(record.snapshot_tokens, 0)
        tokens: list[int] = []
        for start, ids in unpack_entries(self._read_log_bytes(record.id), f"session {record.id} log"):
            if start + len(ids) <= pos:
                continue  # already inside the snapshot (a crash between snapshot and trim)
            if start != pos:
                raise SessionCorruptError(f"session {record.id}: log has a gap or overlap at token {start} "
                                          f"(expected {pos})")
            tokens.extend(ids)
            pos += len(ids)
        return tokens


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileStore(SessionStore):
    """One folder per session under `root`: record.json, state-<tokens>.safetensors, log.bin."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, session_id: str) -> Path:
        if not session_id.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"invalid session id {session_id!r}")
        return self.root / session_id

    def save_record(self, record: SessionRecord) -> None:
        d = self._dir(record.id)
        d.mkdir(exist_ok=True)
        _atomic_write(d / "record.json", record.to_json().encode())

    def load_record(self, session_id: str) -> SessionRecord | None:
        try:
            path = self._dir(session_id) / "record.json"
            return SessionRecord.from_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        except (json.JSONDecodeError, TypeError) as e:
            raise SessionCorruptError(f"session {session_id}: record is corrupt ({e})") from e

    def list_records(self, owner: str) -> list[SessionRecord]:
        out = []
        for d in self.root.iterdir():
            rec = self.load_record(d.name) if (d / "record.json").exists() else None
            if rec is not None and rec.owner == owner:
                out.append(rec)
        return out

    def append_log(self, session_id: str, start: int, token_ids: list[int]) -> None:
        with open(self._dir(session_id) / "log.bin", "ab") as f:
            f.write(pack_entry(start, token_ids))
            f.flush()
            os.fsync(f.fileno())

    def _read_log_bytes(self, session_id: str) -> bytes:
        try:
            return (self._dir(session_id) / "log.bin").read_bytes()
        except FileNotFoundError:
            return b""

    def write_snapshot(self, record: SessionRecord, data: bytes) -> None:
        d = self._dir(record.id)
        d.mkdir(exist_ok=True)
        old = d / f"state-{record.snapshot_tokens}.safetensors"
        _atomic_write(d / f"state-{record.tokens_processed}.safetensors", data)
        record.snapshot_tokens, record.snapshot_sha256 = record.tokens_processed, sha256(data)
        self.save_record(record)  # the commit point: the record now names the new snapshot
        if old.name != f"state-{record.snapshot_tokens}.safetensors":
            old.unlink(missing_ok=True)
        _atomic_write(d / "log.bin", b"")

    def _read_snapshot_bytes(self, record: SessionRecord) -> bytes | None:
        try:
            return (self._dir(record.id) / f"state-{record.snapshot_tokens}.safetensors").read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, session_id: str) -> None:
        d = self._dir(session_id)
        if d.exists():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


class RedisStore(SessionStore):
    """Sessions in Redis (durability as configured on the Redis server, e.g. appendfsync always); leases keep two
    replicas from mutating one session at once."""

    def __init__(self, url: str, prefix: str = "famserve"):
        import redis

        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    def _key(self, session_id: str, part: str) -> str:
        return f"{self.prefix}:session:{session_id}:{part}"

    def save_record(self, record: SessionRecord) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._key(record.id, "record"), record.to_json())
        pipe.sadd(f"{self.prefix}:owner:{record.owner}", record.id)
        pipe.execute()

    def load_record(self, session_id: str) -> SessionRecord | None:
        raw = self.redis.get(self._key(session_id, "record"))
        if raw is None:
            return None
        try:
            return SessionRecord.from_json(raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise SessionCorruptError(f"session {session_id}: record is corrupt ({e})") from e

    def list_records(self, owner: str) -> list[SessionRecord]:
        ids = sorted(i.decode() for i in self.redis.smembers(f"{self.prefix}:owner:{owner}"))
        return [r for r in (self.load_record(i) for i in ids) if r is not None]

    def append_log(self, session_id: str, start: int, token_ids: list[int]) -> None:
        self.redis.append(self._key(session_id, "log"), pack_entry(start, token_ids))

    def _read_log_bytes(self, session_id: str) -> bytes:
        return self.redis.get(self._key(session_id, "log")) or b""

    def write_snapshot(self, record: SessionRecord, data: bytes) -> None:
        record.snapshot_tokens, record.snapshot_sha256 = record.tokens_processed, sha256(data)
        pipe = self.redis.pipeline(transaction=True)  # MULTI/EXEC: snapshot, record and trimmed log at once
        pipe.set(self._key(record.id, "snapshot"), data)
        pipe.set(self._key(record.id, "record"), record.to_json())
        pipe.delete(self._key(record.id, "log"))
        pipe.execute()

    def _read_snapshot_bytes(self, record: SessionRecord) -> bytes | None:
        return self.redis.get(self._key(record.id, "snapshot"))

    def delete(self, session_id: str) -> None:
        rec = self.load_record(session_id)
        keys = [self._key(session_id, p) for p in ("record", "snapshot", "log", "lease")]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*keys)
        if rec is not None:
            pipe.srem(f"{self.prefix}:owner:{rec.owner}", session_id)
        pipe.execute()

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> bool:
        key = self._key(session_id, "lease")
        if self.redis.set(key, holder, nx=True, px=int(ttl_s * 1000)):
            return True
        current = self.redis.get(key)
        if current is not None and current.decode() == holder:  # our own lease: extend it
            self.redis.pexpire(key, int(ttl_s * 1000))
            return True
        return False

    def release_lease(self, session_id: str, holder: str) -> None:
        # Delete only if we still hold it (compare-and-delete in one server-side step).
        self.redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
                        "return 0", 1, self._key(session_id, "lease"), holder)


def open_store(spec: str) -> SessionStore:
    """`redis://...` -> RedisStore, anything else is a folder for a FileStore."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec)
    return FileStore(spec)
