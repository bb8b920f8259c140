"""Fair sharing of one engine (docs/server.md "Scheduling and fairness"): while a long ingest runs, a short chat's
time to first token stays close to what it is on an idle server, and the ingest keeps advancing between the chats.
Real server, tiny model, generous bounds (the machine is shared)."""

from __future__ import annotations

import random
import threading
import time

import httpx

from server_process import TINY_MODEL_NAME

INGEST_TOKENS = 300_000
CHAT = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4,
        "stream": True}
SLACK_S = 2.0  # how much later than on an idle server a first token may come while the ingest runs


def time_to_first_token(url: str) -> float:
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=CHAT, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                return time.monotonic() - started
    raise AssertionError("the stream ended without a token")


def test_short_chats_get_first_tokens_promptly_while_a_long_ingest_advances(start_server, tiny_args):
    server = start_server(tiny_args(mode="bswa", block_size=64, memory_blocks=2))
    idle = min(time_to_first_token(server.url) for _ in range(3))

    session = httpx.post(f"{server.url}/v1/sessions", json={}).json()["id"]
    rng = random.Random(0)
    ids = [rng.randrange(3, 300) for _ in range(INGEST_TOKENS)]
    answer: dict[str, int] = {}
    ingest = threading.Thread(target=lambda: answer.update(status=httpx.post(
        f"{server.url}/v1/sessions/{session}/append", json={"token_ids": ids}, timeout=600).status_code))
    ingest.start()

    def processed() -> int:
        return httpx.get(f"{server.url}/v1/sessions/{session}").json()["tokens_processed"]

    deadline = time.monotonic() + 60
    while processed() == 0 and ingest.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # the ingest has committed its first piece: it is running
    busy, progress = [], [processed()]
    while ingest.is_alive() and len(busy) < 5:
        busy.append(time_to_first_token(server.url))
        time.sleep(0.2)
        progress.append(processed())
    ingest.join()

    assert answer["status"] == 200 and processed() == INGEST_TOKENS
    assert len(busy) >= 3, "the ingest ended before three chats ran beside it: make it longer"
    assert max(busy) < idle + SLACK_S, (idle, busy)
    assert progress[-1] > progress[0], progress  # the chats did not stop the ingest
