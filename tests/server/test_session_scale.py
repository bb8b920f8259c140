"""One million tokens into one session of a real server (tiny model, FAM mode), as streamed token-id appends: the
state, the server process's memory and the session's storage stay the same size however much the session has read,
every token is counted, and the session still answers afterwards. Slow (about a minute of ingest on 2 CPU cores);
run with `pytest -m slow tests/server/test_session_scale.py -s` to see the memory table."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tiny_models import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")]

TOTAL_TOKENS = 1_000_000
APPENDS = [10_000, 90_000] + [100_000] * 9  # the first two end at the 10k and 100k measuring points
SNAPSHOT_EVERY_TOKENS = 16_384
APPEND_CHUNK_TOKENS = 4096  # SessionLimits.append_chunk_tokens: an append is committed in pieces of this size
SCALE_ARGS = dict(mode="fam", block_size=256, memory_blocks=1, fam_length=8, sink_tokens=4,
                  snapshot_every_tokens=SNAPSHOT_EVERY_TOKENS, max_body_bytes=4 * 2**20)
RSS_GROWTH_LIMIT = 0.05  # VmRSS at 1M tokens may exceed VmRSS at 100k by at most this fraction
BODY_PIECE_BYTES = 1 << 16  # the JSON body is sent in pieces of this size (chunked transfer encoding)
LOG_ENTRY_HEADER_BYTES = 16  # store.py: start offset, count, crc32 before each entry's int32 token ids
# With snapshots taken during an append, the log never holds more than one snapshot interval plus one piece.
MAX_LOG_BYTES = (4 * (SNAPSHOT_EVERY_TOKENS + APPEND_CHUNK_TOKENS)
                 + LOG_ENTRY_HEADER_BYTES * (SNAPSHOT_EVERY_TOKENS // APPEND_CHUNK_TOKENS + 2))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    return int(kib) * 1024


def token_ids(rng: random.Random, count: int) -> list[int]:
    """Random ordinary tokens (no special token, so nothing in the stream reads as a chat turn)."""
    return [rng.randrange(len(TINY_SPECIAL_TOKENS), TINY_VOCAB_SIZE) for _ in range(count)]


def streamed_json(body: dict) -> Iterator[bytes]:
    data = json.dumps(body).encode()
    for start in range(0, len(data), BODY_PIECE_BYTES):
        yield data[start:start + BODY_PIECE_BYTES]


def append(http: httpx.Client, session_id: str, ids: list[int]) -> dict:
    """One append with a streamed body and progress events; returns the session info of the last event."""
    with http.stream("POST", f"/v1/sessions/{session_id}/append?stream=true", content=streamed_json(
            {"token_ids": ids}), headers={"Content-Type": "application/json"}) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    progress = [json.loads(event) for event in events[:-1]]
    assert all("error" not in p for p in progress), progress
    assert progress[-1]["tokens_appended"] == len(ids)
    return progress[-1]["session"]


class LogWatcher(threading.Thread):
    """Polls the size of a session's log file while appends run; `max_bytes` is the largest size seen."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.max_bytes, self.stopped = path, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            try:
                self.max_bytes = max(self.max_bytes, self.path.stat().st_size)
            except FileNotFoundError:
                pass


def test_one_million_tokens_leave_state_memory_and_storage_constant(start_server, tiny_args, tmp_path):
    assert sum(APPENDS) == TOTAL_TOKENS
    server = start_server(tiny_args(state_dir=tmp_path, **SCALE_ARGS))
    rng = random.Random(0)
    with httpx.Client(base_url=server.url, timeout=600) as http:
        session_id = http.post("/v1/sessions", json={}).json()["id"]
        watcher = LogWatcher(tmp_path / session_id / "log.bin")
        watcher.start()
        started_s = time.monotonic()
        table = []  # (tokens_processed, state_bytes, VmRSS bytes, seconds for the append)
        for count in APPENDS:
            ids = token_ids(rng, count)
            append_started_s = time.monotonic()
            info = append(http, session_id, ids)
            table.append((info["tokens_processed"], info["state_bytes"], rss_bytes(server.process.pid),
                          time.monotonic() - append_started_s))
        ingest_s = time.monotonic() - started_s
        watcher.stopped.set()
        watcher.join()

        print(f"\n{'tokens':>10} {'state_bytes':>12} {'VmRSS MiB':>10} {'append s':>9}")
        for tokens, state_bytes, rss, seconds in table:
            print(f"{tokens:>10} {state_bytes:>12} {rss / 2**20:>10.1f} {seconds:>9.1f}")
        print(f"ingest of {TOTAL_TOKENS} tokens: {ingest_s:.0f} s; largest log seen: {watcher.max_bytes} bytes")

        (tokens_10k, state_10k, _, _), (tokens_100k, _, rss_100k, _) = table[0], table[1]
        tokens_1m, state_1m, rss_1m, _ = table[-1]
        assert (tokens_10k, tokens_100k, tokens_1m) == (10_000, 100_000, TOTAL_TOKENS)
        assert state_1m == state_10k
        # After the 10k and 90k appends every allocation size the ingest uses has been seen once (the appends that
        # follow are the same size), so growth past this point would be memory kept per token read.
        assert rss_1m <= rss_100k * (1 + RSS_GROWTH_LIMIT), table
        assert 0 < watcher.max_bytes <= MAX_LOG_BYTES

        info = http.get(f"/v1/sessions/{session_id}").json()
        assert info["tokens_processed"] == TOTAL_TOKENS and info["state_bytes"] == state_10k
        assert info["blocks"] == TOTAL_TOKENS // SCALE_ARGS["block_size"]
        assert len(list((tmp_path / session_id).glob("state-*.safetensors"))) == 1  # older snapshots are gone

        r = http.post(f"/v1/sessions/{session_id}/completions",
                      json={"prompt": " The answer is", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        completion = r.json()
        assert completion["usage"]["completion_tokens"] == 8 and completion["choices"][0]["finish_reason"] == "length"
        after = http.get(f"/v1/sessions/{session_id}").json()
        assert after["tokens_processed"] == TOTAL_TOKENS + completion["usage"]["total_tokens"]
        assert after["state_bytes"] == state_10k
