"""Durability and scale-out with real processes: kill -9 a server during appends and restart it on the same state
dir (every acknowledged append is there, and the continuation equals an uninterrupted run's); two servers sharing
one real redis-server (create on A, continue on B, same result as one server)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from services import RedisServer

FAM_ARGS = dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2, snapshot_every_tokens=40)
PIECES = [f"Line {i}: the archive keeps note {i * 37 % 101}.\n" for i in range(60)]


def answer(url: str, session_id: str) -> str:
    r = httpx.post(f"{url}/v1/sessions/{session_id}/completions",
                   json={"prompt": " Note:", "max_tokens": 10, "temperature": 0, "commit": False}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_kill_9_during_appends_loses_no_acknowledged_append(start_server, tiny_args, tmp_path):
    state = tmp_path / "state"
    first = start_server(tiny_args(state_dir=state, **FAM_ARGS))
    sid = httpx.post(f"{first.url}/v1/sessions", json={}).json()["id"]
    acked: list[int] = []  # tokens_processed after each acknowledged append

    def appender():
        for piece in PIECES:
            try:
                r = httpx.post(f"{first.url}/v1/sessions/{sid}/append", json={"text": piece}, timeout=30)
            except httpx.TransportError:
                return
            acked.append(r.json()["session"]["tokens_processed"])

    worker = threading.Thread(target=appender)
    worker.start()
    while len(acked) < 25 and worker.is_alive():
        time.sleep(0.01)
    first.process.kill()  # SIGKILL: no shutdown hook runs
    worker.join(30)
    assert 25 <= len(acked) < len(PIECES)

    second = start_server(tiny_args(state_dir=state, **FAM_ARGS))
    recovered = httpx.get(f"{second.url}/v1/sessions/{sid}").json()["tokens_processed"]
    # The append in flight at the kill may have reached the log without its answer reaching the client.
    appended = next(n for n in range(len(acked), len(PIECES) + 1)
                    if recovered == _tokens(second.url, PIECES[:n]))
    assert appended in (len(acked), len(acked) + 1) and recovered >= acked[-1]

    control = httpx.post(f"{second.url}/v1/sessions", json={}).json()["id"]
    for piece in PIECES[:appended]:
        httpx.post(f"{second.url}/v1/sessions/{control}/append", json={"text": piece}, timeout=30)
    assert answer(second.url, sid) == answer(second.url, control)


def _tokens(url: str, pieces: list[str]) -> int:
    return sum(len(httpx.post(f"{url}/tokenize", json={"prompt": p, "add_special_tokens": False}).json()["tokens"])
               for p in pieces)


@pytest.fixture
def redis_url(tmp_path):
    redis = RedisServer(tmp_path)
    yield redis.url
    redis.stop()


def test_two_replicas_share_sessions_through_redis(start_server, tiny_args, redis_url):
    a = start_server(tiny_args(session_store=redis_url, **FAM_ARGS))
    b = start_server(tiny_args(session_store=redis_url, **FAM_ARGS))
    turn = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "temperature": 0}

    sid = httpx.post(f"{a.url}/v1/sessions", json={"system_prompt": "Be brief."}).json()["id"]
    httpx.post(f"{a.url}/v1/sessions/{sid}/append", json={"text": "".join(PIECES[:10])}, timeout=60)
    on_b = httpx.post(f"{b.url}/v1/sessions/{sid}/chat/completions", json=turn, timeout=60)
    assert on_b.status_code == 200, on_b.text

    alone = httpx.post(f"{a.url}/v1/sessions", json={"system_prompt": "Be brief."}).json()["id"]
    httpx.post(f"{a.url}/v1/sessions/{alone}/append", json={"text": "".join(PIECES[:10])}, timeout=60)
    on_a = httpx.post(f"{a.url}/v1/sessions/{alone}/chat/completions", json=turn, timeout=60)
    assert on_b.json()["choices"][0]["message"]["content"] == on_a.json()["choices"][0]["message"]["content"]

    # back on A, which must notice B's turn (its hot copy is stale) and continue from it
    info_a = httpx.get(f"{a.url}/v1/sessions/{sid}").json()
    assert info_a["turns"] == 1
    assert answer(a.url, sid) == answer(b.url, sid)
    a.stop()
    assert answer(b.url, sid) == answer(b.url, sid)  # the first replica is gone; the session lives on
