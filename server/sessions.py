"""SessionManager: persistent FAM streams. Hot sessions live in memory under a byte budget (least recently used are
snapshotted and dropped); cold ones load on demand as snapshot + replay of the log. Every committed mutation is in
the store's log before it is acknowledged, and one mutation at a time runs per session (others get 409).

A mutation that fails half way (client gone, engine error) rolls the session back to its last committed point by
dropping the hot copy: the next use reloads it from the store. Nothing is ever silently reset."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from famserve.engine.engine import AsyncEngine, GenerationRequest
from famserve.engine.errors import FamserveError, InvalidRequestError
from famserve.engine.model import FamModel
from famserve.engine.sampling import SamplingParams
from famserve.engine.state import FamState, read_metadata
from famserve.engine.tokenizer import Tokenizer

from .store import SessionCorruptError, SessionRecord, SessionStore

log = logging.getLogger(__name__)


class SessionNotFoundError(FamserveError):
    """No such session for this API key (another key's session is reported the same way)."""


class SessionBusyError(FamserveError):
    """Another mutation of this session is running (here or on another replica)."""


def owner_of(api_key: str | None) -> str:
    """Sessions belong to a hash of the API key that created them, never the key itself."""
    return "anonymous" if not api_key else hashlib.sha256(api_key.encode()).hexdigest()[:24]


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


@dataclass(eq=False)
class Session:
    record: SessionRecord
    state: FamState
    busy: bool = False
    tokens_since_snapshot: int = 0


@dataclass
class SessionLimits:
    memory_budget_bytes: int  # hot states held in memory at most; LRU beyond
    snapshot_every_tokens: int = 16384  # snapshot once this many tokens are only in the log (bounds replay time)
    append_chunk_tokens: int = 4096  # an append is committed to the log in pieces of this size
    lease_ttl_s: float = 60.0  # how long a replica's claim on a session lasts without renewal


@dataclass
class SessionStats:
    """What /metrics shows of the sessions; the counters count since the process started."""
    num_hot: int = 0  # sessions whose state is in memory
    hot_bytes: int = 0
    budget_bytes: int = 0  # --session-memory-bytes
    loads_total: int = 0  # states rebuilt from the store (cold, or changed by another replica)
    replayed_tokens_total: int = 0  # log tokens prefilled again by those loads
    evictions_total: int = 0  # idle states dropped from memory to stay within the budget
    snapshots_total: int = 0  # states written to the store


class SessionManager:
    def __init__(self, store: SessionStore, engine: AsyncEngine, model: FamModel, tokenizer: Tokenizer,
                 model_id: str, limits: SessionLimits):
        self.store, self.engine, self.model, self.tokenizer = store, engine, model, tokenizer
        self.model_id, self.limits = model_id, limits
        self.replica_id = uuid.uuid4().hex
        self.hot: OrderedDict[str, Session] = OrderedDict()
        self._scratch: list[FamState] = []  # reusable states for forks that are thrown away
        self._stats = SessionStats(budget_bytes=limits.memory_budget_bytes)

    # --- lookup and lifecycle ----------------------------------------------------------------------------------

    def _record(self, owner: str, session_id: str) -> SessionRecord:
        record = self.store.load_record(session_id) if _valid_id(session_id) else None
        if record is None or record.owner != owner:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return record

    async def create(self, owner: str, system_prompt: str | None = None, metadata: dict | None = None) -> SessionRecord:
        now = time.time()
        record = SessionRecord(id=new_session_id(), owner=owner, model_id=self.model_id,
                               fam_config=asdict(self.model.fam_config), created_at=now, last_used_at=now,
                               metadata=dict(metadata or {}))
        await asyncio.to_thread(self.store.save_record, record)
        session = Session(record, self.model.new_state())
        await self._make_hot(session)
        if system_prompt:
            message = {"role": "system", "content": system_prompt}
            async with self.mutate(owner, record.id) as s:
                await self.consume(s, self.tokenizer.apply_chat_template([message], add_generation_prompt=False))
                s.record.anchor_messages = [message]
        return record

    def get(self, owner: str, session_id: str) -> SessionRecord:
        """The committed record, from the store: another replica may have changed the session since we held it."""
        return self._record(owner, session_id)

    def list(self, owner: str) -> list[SessionRecord]:
        return sorted(self.store.list_records(owner), key=lambda r: (r.created_at, r.id))

    async def delete(self, owner: str, session_id: str) -> None:
        self._record(owner, session_id)
        hot = self.hot.get(session_id)
        if hot is not None and hot.busy:
            raise SessionBusyError(f"session {session_id} is busy; retry when its request has finished")
        self.hot.pop(session_id, None)
        await asyncio.to_thread(self.store.delete, session_id)

    # --- mutation ----------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def mutate(self, owner: str, session_id: str) -> AsyncIterator[Session]:
        """Exclusive, transactional access: on success the record is saved (version + 1); on failure the hot copy
        is dropped so the session reverts to what the store holds."""
        hot = self.hot.get(session_id)
        if hot is not None and hot.busy:
            raise SessionBusyError(f"session {session_id} is busy with another request; retry when it has finished")
        if not await asyncio.to_thread(self.store.acquire_lease, session_id, self.replica_id, self.limits.lease_ttl_s):
            raise SessionBusyError(f"session {session_id} is being changed by another replica; retry shortly")
        try:
            session = await self._load(owner, session_id)
            if session.busy:
                raise SessionBusyError(f"session {session_id} is busy with another request")
            session.busy = True
            try:
                yield session
            except BaseException:
                self.hot.pop(session_id, None)  # roll back to the committed state
                raise
            finally:
                session.busy = False
            session.record.version += 1
            session.record.last_used_at = time.time()
            session.record.tokens_processed = session.state.num_tokens
            if session.tokens_since_snapshot >= self.limits.snapshot_every_tokens:
                await self._snapshot(session)
            else:
                await asyncio.to_thread(self.store.save_record, session.record)
        finally:
            await asyncio.to_thread(self.store.release_lease, session_id, self.replica_id)

    async def consume(self, session: Session, token_ids: Sequence[int]) -> None:
        """Feed tokens into the session's state and commit them to the log (durable before this returns)."""
        if not token_ids:
            return
        start = session.state.num_tokens
        await self._run_prefill(session.state, list(token_ids))
        await self._renew_lease(session.record.id)
        await asyncio.to_thread(self.store.append_log, session.record.id, start, list(token_ids))
        session.tokens_since_snapshot += len(token_ids)
        session.record.tokens_processed = session.state.num_tokens

    async def _renew_lease(self, session_id: str) -> None:
        """Extend this replica's claim before each commit: a long ingest or generation outlives one lease_ttl_s, and
        a claim that another replica took over in the meantime must stop this one from writing."""
        if not await asyncio.to_thread(self.store.acquire_lease, session_id, self.replica_id, self.limits.lease_ttl_s):
            raise SessionBusyError(f"session {session_id} was taken over by another replica while this request ran; "
                                   "what it had not committed yet is discarded")

    async def append_chunks(self, session: Session, chunks: AsyncIterator[list[int]]) -> AsyncIterator[int]:
        """Consume an unbounded stream of token chunks, committing every append_chunk_tokens; yields the running
        count of tokens committed (for progress reports). Snapshots are taken as the append goes, so neither the log
        nor the replay after a crash grows with the size of one append."""
        buffer: list[int] = []
        done = 0
        async for chunk in chunks:
            buffer.extend(chunk)
            while len(buffer) >= self.limits.append_chunk_tokens:
                piece, buffer = buffer[:self.limits.append_chunk_tokens], buffer[self.limits.append_chunk_tokens:]
                await self._commit_piece(session, piece)
                done += len(piece)
                yield done
        if buffer:
            await self._commit_piece(session, buffer)
            done += len(buffer)
            yield done

    async def _commit_piece(self, session: Session, token_ids: list[int]) -> None:
        await self.consume(session, token_ids)
        if session.tokens_since_snapshot >= self.limits.snapshot_every_tokens:
            session.record.version += 1  # a commit point inside the mutation: other replicas must reload
            await self._snapshot(session)

    def scratch_copy(self, session: Session) -> FamState:
        """A throw-away fork of the session's state (for generation that must not be committed as is)."""
        state = self._scratch.pop() if self._scratch else None
        if state is None:
            return session.state.clone()
        state.copy_(session.state)
        return state

    def release_scratch(self, state: FamState) -> None:
        self._scratch.append(state)

    async def _run_prefill(self, state: FamState, token_ids: list[int]) -> None:
        request = GenerationRequest(f"ingest-{uuid.uuid4().hex}", token_ids, SamplingParams(max_tokens=1),
                                    state=state, prefill_only=True)
        async for out in self.engine.generate(request):
            if out.finished and out.finish_reason != "prefilled":
                raise FamserveError(f"ingest did not complete ({out.finish_reason}: {out.error})")

    # --- fork, export, import ----------------------------------------------------------------------------------

    async def fork(self, owner: str, session_id: str) -> SessionRecord:
        async with self.mutate(owner, session_id) as source:  # exclusive, so the copy is consistent
            now = time.time()
            record = SessionRecord(**{**asdict(source.record), "id": new_session_id(), "created_at": now,
                                      "last_used_at": now, "version": 0, "snapshot_tokens": -1,
                                      "snapshot_sha256": "",
                                      "metadata": {**source.record.metadata, "forked_from": session_id}})
            copy = Session(record, source.state.clone())
            await self._snapshot(copy)  # the copy's history is the source's, so it starts from a snapshot
            await self._make_hot(copy)
        return record

    async def export(self, owner: str, session_id: str) -> bytes:
        async with self.mutate(owner, session_id) as session:
            return self._state_bytes(session)

    async def import_(self, owner: str, data: bytes) -> SessionRecord:
        meta = read_metadata(data, "uploaded state")
        state = FamState.from_bytes(data, self.model.config, self.model.fam_config, self.model.device,
                                    self.model.dtype, source="uploaded state")
        now = time.time()
        try:
            saved = SessionRecord.from_json(meta["session"]) if "session" in meta else None
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"uploaded state: session metadata is corrupt ({e})") from e
        record = SessionRecord(id=new_session_id(), owner=owner, model_id=self.model_id,
                               fam_config=asdict(self.model.fam_config), created_at=now, last_used_at=now,
                               metadata=saved.metadata if saved else {},
                               anchor_messages=saved.anchor_messages if saved else [],
                               turns=saved.turns if saved else 0, tokens_processed=state.num_tokens)
        session = Session(record, state)
        await self._snapshot(session)
        await self._make_hot(session)
        return record

    def _state_bytes(self, session: Session) -> bytes:
        return session.state.to_bytes(self.model_id, self.model.config, self.model.fam_config,
                                      extra={"session": session.record.to_json()})

    # --- memory and storage ------------------------------------------------------------------------------------

    async def _snapshot(self, session: Session) -> None:
        session.record.tokens_processed = session.state.num_tokens
        data = self._state_bytes(session)
        await asyncio.to_thread(self.store.write_snapshot, session.record, data)
        session.tokens_since_snapshot = 0
        self._stats.snapshots_total += 1

    async def _load(self, owner: str, session_id: str) -> Session:
        record = await asyncio.to_thread(self._record, owner, session_id)
        hot = self.hot.get(session_id)
        if hot is not None and hot.record.version == record.version:
            self.hot.move_to_end(session_id)
            return hot
        # Cold, or changed by another replica since we held it: rebuild from the store.
        snapshot = await asyncio.to_thread(self.store.read_snapshot, record)
        if snapshot is None:
            state = self.model.new_state()
        else:
            state = FamState.from_bytes(snapshot, self.model.config, self.model.fam_config, self.model.device,
                                        self.model.dtype, source=f"session {session_id} snapshot")
        replay = await asyncio.to_thread(self.store.read_log, record)
        if replay:
            await self._run_prefill(state, replay)
        self._stats.loads_total += 1
        self._stats.replayed_tokens_total += len(replay)
        if state.num_tokens < record.tokens_processed:
            raise SessionCorruptError(f"session {session_id}: store holds {state.num_tokens} tokens but the record "
                                      f"says {record.tokens_processed}")
        record.tokens_processed = state.num_tokens  # a crash between log and record leaves the log ahead: trust it
        session = Session(record, state, tokens_since_snapshot=len(replay))
        await self._make_hot(session)
        return session

    async def _make_hot(self, session: Session) -> None:
        self.hot[session.record.id] = session
        self.hot.move_to_end(session.record.id)
        await self._evict_over_budget()

    async def _evict_over_budget(self) -> None:
        """Snapshot and drop least recently used idle sessions past the budget (they are durable already; the
        snapshot only spares the replay when they come back)."""
        while len(self.hot) > 1 and self.resident_bytes > self.limits.memory_budget_bytes:
            victim = next((s for s in self.hot.values() if not s.busy), None)
            if victim is None:
                return
            del self.hot[victim.record.id]
            self._stats.evictions_total += 1
            if victim.tokens_since_snapshot:
                await self._snapshot(victim)

    async def flush(self) -> None:
        """Snapshot every hot session with unsnapshotted tokens (shutdown): restarts then replay nothing."""
        for session in list(self.hot.values()):
            if session.tokens_since_snapshot and not session.busy:
                await self._snapshot(session)

    @property
    def resident_bytes(self) -> int:
        return sum(s.state.nbytes for s in self.hot.values())

    def stats(self) -> SessionStats:
        """The counters with the gauges brought up to date (read when Prometheus scrapes)."""
        self._stats.num_hot, self._stats.hot_bytes = len(self.hot), self.resident_bytes
        return self._stats


def _valid_id(session_id: str) -> bool:
    return session_id.startswith("sess_") and session_id[5:].isalnum() and len(session_id) < 64
