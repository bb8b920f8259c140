"""Load on a real server process (tiny model, loopback): 64 concurrent streaming chat clients, three requests each, a
quarter of them hanging up after the first token, against 8 engine slots, a state budget of 6 states and 16 queue
places. Every answer is a complete 200 stream or an explicit 429 with Retry-After; afterwards nothing is running,
waiting or holding a state, the counts on /metrics agree with what the clients saw, and the server still answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig

MODEL = "tiny-llama"
NUM_CLIENTS = 64
REQUESTS_PER_CLIENT = 3
MAX_RUNNING, BUDGET_STATES, MAX_WAITING = 8, 6, 16
CLIENT_TIMEOUT_S = 30.0
TEST_BUDGET_S = 60.0  # the whole load, generously: it takes about 10 s on an idle 2-core machine


@pytest.fixture(scope="module")
def server(start_server, tiny_args, tiny_llama_dir: Path):
    state_nbytes = load_model(tiny_llama_dir, FamConfig(), "bswa").model.state_nbytes  # the server's defaults
    return start_server(tiny_args(max_running=MAX_RUNNING, max_waiting=MAX_WAITING,
                                  state_memory_bytes=BUDGET_STATES * state_nbytes))


def chat(i: int, k: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"client {i} request {k}: tell me a story"}],
            "max_tokens": 16 + (7 * i + k) % 48, "ignore_eos": True, "stream": True}


async def one_client(url: str, i: int) -> list[str]:
    """Runs the client's requests one after another; returns one outcome per request: "done", "hung_up" or "429"."""
    hangs_up = i % 4 == 3
    outcomes = []
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        for k in range(REQUESTS_PER_CLIENT):
            async with client.stream("POST", "/v1/chat/completions", json=chat(i, k)) as response:
                if response.status_code == 429:
                    assert response.headers["retry-after"] == "1"
                    assert json.loads(await response.aread())["error"]["code"] == "queue_full"
                    outcomes.append("429")
                    continue
                assert response.status_code == 200, await response.aread()
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if hangs_up and len(events) == 2:  # the role chunk, then the first token
                            break
                if hangs_up:
                    outcomes.append("hung_up")
                    continue
            assert events[-1] == "[DONE]" and all('"error"' not in e for e in events)
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
            outcomes.append("done")
    return outcomes


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_concurrent_streams_get_200_or_429_and_leave_nothing_behind(server) -> None:
    async def load() -> list[list[str]]:
        return await asyncio.gather(*(one_client(server.url, i) for i in range(NUM_CLIENTS)))

    started = time.monotonic()
    outcomes = Counter(o for client in asyncio.run(asyncio.wait_for(load(), TEST_BUDGET_S)) for o in client)
    elapsed_s = time.monotonic() - started
    assert sum(outcomes.values()) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    assert outcomes["done"] > 0 and outcomes["hung_up"] > 0 and outcomes["429"] > 0, outcomes

    deadline = time.monotonic() + 5
    while (samples := scrape(server.url))["famserve_num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the last hang-ups reach the engine within a step
    assert samples["famserve_num_requests_running"] == 0
    assert samples["famserve_num_requests_waiting"] == 0
    assert samples["famserve_states_resident"] == 0 and samples["famserve_states_resident_bytes"] == 0
    assert samples["famserve_states_pooled_bytes"] <= samples["famserve_states_budget_bytes"]
    answered = outcomes["done"] + outcomes["hung_up"]  # a 200 waits for the first token: every one was admitted
    assert samples["famserve_request_queue_time_seconds_count"] == answered
    route = 'famserve_requests_total{route="/v1/chat/completions",status="%s"}'
    assert samples[route % "200"] == answered and samples[route % "429"] == outcomes["429"]
    assert samples["famserve_batch_size_bucket{le=\"8.0\"}"] == samples["famserve_batch_size_count"]  # <= 8 slots

    response = httpx.post(f"{server.url}/v1/chat/completions", json={**chat(0, 0), "stream": False}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
    print(f"load: {dict(outcomes)} in {elapsed_s:.1f} s")
