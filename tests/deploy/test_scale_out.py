"""Scale-out as deploy/compose.yaml runs it, with real processes on loopback: one redis-server, two famserve replicas
sharing it (--session-store redis://...) and nginx with the router rule of deploy/nginx/famserve.conf in front. A
session created and used through the router keeps going through the router after the replica serving it is stopped
(SIGTERM; it drains and exits 0): the other replica loads it from Redis and answers exactly as one uninterrupted
server does (greedy decoding)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deploy_services import NginxRouter
from server_process import ServerProcess, tiny_server_args
from services import RedisServer

REPLICAS = ("famserve-1", "famserve-2")
SESSION_ARGS = dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
SYSTEM_PROMPT = "You answer in a few words."
TEXT = "".join(f"Entry {i}: the lighthouse logged {i * 29 % 83} ships.\n" for i in range(30))
TURNS = ["How many ships in entry 4?", "And in entry 7?"]


@pytest.fixture
def cluster(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[tuple[str, dict[str, ServerProcess]]]:
    """(router URL, replica name -> ServerProcess): Redis, two replicas on it and the router, stopped afterwards."""
    redis = RedisServer(tmp_path)
    replicas: dict[str, ServerProcess] = {}
    router = None
    try:
        args = tiny_server_args(tiny_llama_dir, session_store=redis.url, **SESSION_ARGS)
        for name in REPLICAS:
            (tmp_path / name).mkdir()
            replicas[name] = ServerProcess(args, tmp_path / name / "server.log")
        for server in replicas.values():
            server.wait_ready()
        (tmp_path / "router").mkdir()
        router = NginxRouter(tmp_path / "router", {name: server.port for name, server in replicas.items()})
        yield router.url, replicas
    finally:
        if router is not None:
            router.stop()
        for server in replicas.values():
            server.stop()
        redis.stop()


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _conversation(client: httpx.Client, session_id: str, turns: list[str]) -> list[str]:
    """Chat turns in a session (only the new message each time; the session holds the rest): the replies."""
    return [_ok(client.post(f"/v1/sessions/{session_id}/chat/completions", json={
        "messages": [{"role": "user", "content": turn}], "max_tokens": 8, "temperature": 0}))
        ["choices"][0]["message"]["content"] for turn in turns]


def _new_session(client: httpx.Client) -> str:
    session_id = _ok(client.post("/v1/sessions", json={"system_prompt": SYSTEM_PROMPT}))["id"]
    _ok(client.post(f"/v1/sessions/{session_id}/append", json={"text": TEXT}))
    return session_id


def _served(server: ServerProcess, session_id: str) -> bool:
    """Whether the replica's access log shows a chat turn of the session."""
    return f"POST /v1/sessions/{session_id}/chat/completions" in server.log_text()


def test_a_session_continues_through_the_router_when_its_replica_stops(cluster) -> None:
    router_url, replicas = cluster
    with httpx.Client(base_url=router_url, timeout=120) as router:
        session_id = _new_session(router)
        first = _conversation(router, session_id, TURNS[:1])
        owner = next(name for name, server in replicas.items() if _served(server, session_id))
        survivor = next(name for name in replicas if name != owner)
        assert not _served(replicas[survivor], session_id)  # the router kept the session on one replica

        assert replicas[owner].stop() == 0  # SIGTERM: drains, persists, exits 0
        second = _conversation(router, session_id, TURNS[1:])
        assert _served(replicas[survivor], session_id)
        info = _ok(router.get(f"/v1/sessions/{session_id}"))

    # The reference: the whole conversation on one server that never stopped.
    with httpx.Client(base_url=replicas[survivor].url, timeout=120) as alone:
        reference_id = _new_session(alone)
        assert first + second == _conversation(alone, reference_id, TURNS)
        assert info["tokens_processed"] == _ok(alone.get(f"/v1/sessions/{reference_id}"))["tokens_processed"]
        assert info["turns"] == len(TURNS)
