"""SessionManager against a real engine thread and a real FileStore: restart recovery (snapshot + log replay),
fork independence, export/import, ownership, busy sessions, and corruption refused."""

import asyncio
import uuid

import pytest

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.engine import AsyncEngine, GenerationRequest, LLMEngine
from famserve.engine.errors import StateMismatchError
from famserve.engine.sampling import SamplingParams
from famserve.server.sessions import (SessionBusyError, SessionLimits, SessionManager, SessionNotFoundError,
                                      owner_of)
from famserve.server.store import FileStore, SessionCorruptError

FAM = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
OWNER = owner_of("key-a")


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir, FAM, "fam")


@pytest.fixture
def engine(loaded):
    eng = AsyncEngine(LLMEngine(loaded.model, eos_token_ids=[], max_running=8))
    eng.start()
    yield eng
    eng.shutdown()


def manager(loaded, engine, store, **limits) -> SessionManager:
    return SessionManager(store, engine, loaded.model, loaded.tokenizer, "tiny",
                          SessionLimits(memory_budget_bytes=limits.pop("budget", 10**9), **limits))


async def greedy(mgr: SessionManager, owner: str, session_id: str, n: int = 12) -> list[int]:
    """Greedy continuation of a session on a throw-away copy (the session is not changed)."""
    async with mgr.mutate(owner, session_id) as s:
        state = mgr.scratch_copy(s)
    out = []
    request = GenerationRequest(uuid.uuid4().hex, [7], SamplingParams(max_tokens=n, temperature=0), state=state)
    async for o in mgr.engine.generate(request):
        out += o.token_ids
    return out


def tokens(n, seed):
    return [(i * 7919 + seed * 104729) % 200 + 3 for i in range(n)]


def test_restart_recovers_from_snapshot_and_log(loaded, engine, tmp_path):
    async def scenario():
        store = FileStore(tmp_path)
        first = manager(loaded, engine, store, snapshot_every_tokens=20)
        rec = await first.create(OWNER, metadata={"k": "v"})
        for i in range(5):  # 5 x 9 tokens: snapshots happen after 27 and the rest stays in the log
            async with first.mutate(OWNER, rec.id) as s:
                await first.consume(s, tokens(9, i))
        expected = await greedy(first, OWNER, rec.id)
        restarted = manager(loaded, engine, FileStore(tmp_path), snapshot_every_tokens=20)  # nothing hot
        info = restarted.get(OWNER, rec.id)
        assert info.tokens_processed == 45 and info.snapshot_tokens > 0 and info.metadata == {"k": "v"}
        assert await greedy(restarted, OWNER, rec.id) == expected

    asyncio.run(scenario())


def test_fork_is_independent_and_export_import_round_trips(loaded, engine, tmp_path):
    async def scenario():
        mgr = manager(loaded, engine, FileStore(tmp_path))
        rec = await mgr.create(OWNER)
        async with mgr.mutate(OWNER, rec.id) as s:
            await mgr.consume(s, tokens(13, 1))
        fork = await mgr.fork(OWNER, rec.id)
        before = await greedy(mgr, OWNER, rec.id)
        assert await greedy(mgr, OWNER, fork.id) == before
        async with mgr.mutate(OWNER, fork.id) as s:
            await mgr.consume(s, tokens(11, 2))
        assert await greedy(mgr, OWNER, rec.id) == before  # the source did not move
        assert mgr.get(OWNER, fork.id).tokens_processed == 24 and mgr.get(OWNER, rec.id).tokens_processed == 13
        data = await mgr.export(OWNER, fork.id)
        imported = await mgr.import_(OWNER, data)
        assert imported.tokens_processed == 24
        assert await greedy(mgr, OWNER, imported.id) == await greedy(mgr, OWNER, fork.id)

    asyncio.run(scenario())


def test_other_owner_sees_nothing_and_busy_session_refuses(loaded, engine, tmp_path):
    async def scenario():
        mgr = manager(loaded, engine, FileStore(tmp_path))
        rec = await mgr.create(OWNER)
        with pytest.raises(SessionNotFoundError):
            mgr.get(owner_of("key-b"), rec.id)
        with pytest.raises(SessionNotFoundError):
            async with mgr.mutate(owner_of("key-b"), rec.id):
                pass
        assert [r.id for r in mgr.list(owner_of("key-b"))] == []
        async with mgr.mutate(OWNER, rec.id):
            with pytest.raises(SessionBusyError):
                async with mgr.mutate(OWNER, rec.id):
                    pass

    asyncio.run(scenario())


def test_failed_mutation_rolls_back(loaded, engine, tmp_path):
    async def scenario():
        mgr = manager(loaded, engine, FileStore(tmp_path))
        rec = await mgr.create(OWNER)
        async with mgr.mutate(OWNER, rec.id) as s:
            await mgr.consume(s, tokens(10, 3))
        expected = await greedy(mgr, OWNER, rec.id)
        with pytest.raises(RuntimeError):
            async with mgr.mutate(OWNER, rec.id) as s:
                await mgr._run_prefill(s.state, tokens(5, 4))  # fed but never committed
                raise RuntimeError("client went away")
        assert mgr.get(OWNER, rec.id).tokens_processed == 10
        assert await greedy(mgr, OWNER, rec.id) == expected

    asyncio.run(scenario())


def test_corrupt_log_and_snapshot_are_refused(loaded, engine, tmp_path):
    async def scenario():
        mgr = manager(loaded, engine, FileStore(tmp_path), snapshot_every_tokens=10)
        rec = await mgr.create(OWNER)
        for i in range(2):
            async with mgr.mutate(OWNER, rec.id) as s:
                await mgr.consume(s, tokens(6, i))
        async with mgr.mutate(OWNER, rec.id) as s:  # 12 tokens snapshotted, these 6 only in the log
            await mgr.consume(s, tokens(6, 5))
        log = tmp_path / rec.id / "log.bin"
        data = bytearray(log.read_bytes())
        data[-3] ^= 0xFF
        log.write_bytes(bytes(data))
        with pytest.raises(SessionCorruptError, match="checksum"):
            async with manager(loaded, engine, FileStore(tmp_path)).mutate(OWNER, rec.id):
                pass
        snapshot = next((tmp_path / rec.id).glob("state-*.safetensors"))
        snapshot.write_bytes(snapshot.read_bytes()[:-100])
        with pytest.raises(SessionCorruptError, match="snapshot"):
            async with manager(loaded, engine, FileStore(tmp_path)).mutate(OWNER, rec.id):
                pass

    asyncio.run(scenario())


def test_import_refuses_a_state_of_another_config(loaded, engine, tmp_path, tiny_llama_dir):
    async def scenario():
        mgr = manager(loaded, engine, FileStore(tmp_path))
        other = load_model(tiny_llama_dir, FamConfig(mode="bswa", block_size=8, memory_blocks=1), "bswa")
        data = other.model.new_state().to_bytes("tiny", other.model.config, other.model.fam_config)
        with pytest.raises(StateMismatchError):
            await mgr.import_(OWNER, data)

    asyncio.run(scenario())



def test_commits_renew_the_redis_lease_and_stop_once_another_replica_holds_it(loaded, engine, tmp_path):
    """A mutation longer than one lease keeps its claim by renewing it at every commit; a claim another replica
    took over in between stops the next commit, which writes nothing."""
    from services import RedisServer

    from famserve.server.store import open_store

    redis = RedisServer(tmp_path)
    try:
        store = open_store(redis.url)
        mgr = manager(loaded, engine, store, lease_ttl_s=0.6)

        async def scenario() -> None:
            rec = await mgr.create(OWNER)
            async with mgr.mutate(OWNER, rec.id) as s:
                for i in range(4):  # 4 commits 0.3 s apart: 1.2 s in all, twice the lease
                    await mgr.consume(s, tokens(5, i))
                    await asyncio.sleep(0.3)
                    assert not store.acquire_lease(rec.id, "other-replica", 10.0)  # still ours: renewed
            with pytest.raises(SessionBusyError, match="taken over by another replica"):
                async with mgr.mutate(OWNER, rec.id) as s:
                    await asyncio.sleep(0.8)  # the claim lapses without a commit ...
                    assert store.acquire_lease(rec.id, "other-replica", 10.0)  # ... and another replica takes it
                    await mgr.consume(s, tokens(5, 9))
            assert mgr.get(OWNER, rec.id).tokens_processed == 20

        asyncio.run(scenario())
    finally:
        redis.stop()
