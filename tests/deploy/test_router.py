"""The router rule of deploy/nginx/famserve.conf, run by a real nginx on loopback (deploy_services.NginxRouter) in
front of two stub replicas that answer with their own name: every request naming a session reaches the same replica,
requests without one alternate (round robin), a session whose replica is down continues on the other, and /metrics
is not exposed. test_scale_out.py puts the same router in front of real famserve processes."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from deploy_services import NginxRouter

SESSION_IDS = [f"sess_{i:04d}{'abcdefgh'[i % 8]}Xy9" for i in range(48)]
SESSION_REQUESTS = [("GET", "/v1/sessions/{id}"), ("POST", "/v1/sessions/{id}/append"),
                    ("POST", "/v1/sessions/{id}/completions"), ("POST", "/v1/sessions/{id}/chat/completions"),
                    ("POST", "/v1/sessions/{id}/fork"), ("GET", "/v1/sessions/{id}/state"),
                    ("DELETE", "/v1/sessions/{id}")]


class _Replica(BaseHTTPRequestHandler):
    """Answers every request with the name of the replica (the server's `name` attribute)."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


class _Router:
    """Two stub replicas (famserve-1, famserve-2) behind the router."""

    def __init__(self, tmp_path: Path) -> None:
        self.replicas: dict[str, ThreadingHTTPServer] = {}
        for name in ("famserve-1", "famserve-2"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
            server.name = name  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.replicas[name] = server
        try:
            self.nginx = NginxRouter(tmp_path, {name: server.server_address[1]
                                                for name, server in self.replicas.items()})
        except BaseException:
            self._stop_replicas()
            raise
        self.url = self.nginx.url

    def _stop_replicas(self) -> None:
        for server in self.replicas.values():
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        self.nginx.stop()
        self._stop_replicas()


def _started_router(tmp_path: Path) -> Iterator[_Router]:
    router = _Router(tmp_path)
    try:
        yield router
    finally:
        router.stop()


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Router]:
    """One router for the tests that leave both replicas up."""
    yield from _started_router(tmp_path_factory.mktemp("router"))


@pytest.fixture
def own_router(tmp_path: Path) -> Iterator[_Router]:
    """A router of its own, for a test that stops a replica."""
    yield from _started_router(tmp_path)


def _replica_for(client: httpx.Client, method: str, path: str) -> str:
    response = client.request(method, path, content=b"{}" if method == "POST" else None)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.text


def test_a_session_stays_on_one_replica_and_sessions_spread(router: _Router) -> None:
    with httpx.Client(base_url=router.url, timeout=10) as client:
        owners = {}
        for session_id in SESSION_IDS:
            seen = {_replica_for(client, method, path.format(id=session_id)) for method, path in SESSION_REQUESTS}
            assert len(seen) == 1, f"{session_id} went to {seen}"
            owners[session_id] = seen.pop()
    counts = Counter(owners.values())
    # 48 ids on a consistent-hash ring of two servers: both get a fair share (binomial; 12..36 covers > 99.9%).
    assert set(counts) == {"famserve-1", "famserve-2"} and min(counts.values()) >= 12, counts


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("POST", "/v1/sessions"), ("POST", "/v1/sessions/import"), ("GET", "/v1/sessions"),
])
def test_requests_without_a_session_alternate(router: _Router, method: str, path: str) -> None:
    with httpx.Client(base_url=router.url, timeout=10) as client:
        replicas = [_replica_for(client, method, path) for _ in range(8)]
    assert Counter(replicas) == {"famserve-1": 4, "famserve-2": 4}, replicas


def test_a_session_continues_on_the_other_replica_when_its_own_is_down(own_router: _Router) -> None:
    router = own_router
    with httpx.Client(base_url=router.url, timeout=10) as client:
        owners = {sid: _replica_for(client, "POST", f"/v1/sessions/{sid}/append") for sid in SESSION_IDS[:16]}
        router.replicas["famserve-1"].shutdown()
        router.replicas["famserve-1"].server_close()
        after = {sid: _replica_for(client, "POST", f"/v1/sessions/{sid}/append") for sid in owners}
    assert set(after.values()) == {"famserve-2"}
    # Consistent hashing: the sessions of the replica that stayed up did not move.
    assert all(after[sid] == "famserve-2" for sid, owner in owners.items() if owner == "famserve-2")


def test_metrics_are_not_exposed_through_the_router(router: _Router) -> None:
    assert httpx.get(f"{router.url}/metrics", timeout=10).status_code == 404
