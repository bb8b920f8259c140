"""The engine's and the sessions' metrics on /metrics of a real server (tiny model in fam mode, L=8, request and
session budgets of exactly one state each): every name the docs and the dashboard use is there with its type, the
counters move by exactly what one request did, the gauges show a running stream, a request waiting for the budget,
and nothing left afterwards, and the session numbers follow evictions and loads from the store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig

MODEL = "tiny-llama"
FAM = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2)
ENGINE_METRICS = {
    "famserve_num_requests_running": "gauge",
    "famserve_num_requests_waiting": "gauge",
    "famserve_states_resident": "gauge",
    "famserve_states_resident_bytes": "gauge",
    "famserve_states_pooled_bytes": "gauge",
    "famserve_states_budget_bytes": "gauge",
    "famserve_states_capacity_left": "gauge",
    "famserve_state_bytes": "gauge",
    "famserve_engine_steps": "counter",  # the parser names counter families without _total
    "famserve_prefill_tokens": "counter",
    "famserve_decode_tokens": "counter",
    "famserve_fam_updates": "counter",
    "famserve_preemptions": "counter",
    "famserve_batch_size": "histogram",
    "famserve_request_queue_time_seconds": "histogram",
}
SESSION_METRICS = {
    "famserve_sessions_hot": "gauge",
    "famserve_sessions_hot_bytes": "gauge",
    "famserve_sessions_budget_bytes": "gauge",
    "famserve_session_loads": "counter",
    "famserve_session_replayed_tokens": "counter",
    "famserve_session_evictions": "counter",
    "famserve_session_snapshots": "counter",
}


@pytest.fixture(scope="module")
def state_nbytes(tiny_llama_dir: Path) -> int:
    """Bytes of one state of the served model and config (float32, like the server)."""
    return load_model(tiny_llama_dir, FAM, "fam").model.state_nbytes


@pytest.fixture(scope="module")
def server(start_server, tiny_args, state_nbytes: int):
    return start_server(tiny_args(mode="fam", block_size=FAM.block_size, memory_blocks=FAM.memory_blocks,
                                  fam_length=FAM.fam_length, sink_tokens=FAM.sink_tokens, max_tokens_cap=4096,
                                  state_memory_bytes=state_nbytes, session_memory_bytes=state_nbytes))


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def scrape(http: httpx.Client) -> tuple[dict[str, float], dict[str, str]]:
    """(sample name with labels -> value, family name -> type) of one /metrics answer."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        types[family.name] = family.type
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples, types


def wait_until(http: httpx.Client, name: str, value: float, timeout_s: float = 10.0) -> dict[str, float]:
    """The samples of the first scrape where `name` reads `value`; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples, _ = scrape(http)
        if samples[name] == value:
            return samples
        assert time.monotonic() < deadline, f"{name} did not reach {value} within {timeout_s} s"
        time.sleep(0.02)


def test_engine_metrics_are_exported_with_their_types(http: httpx.Client, state_nbytes: int) -> None:
    samples, types = scrape(http)
    assert {name: types.get(name) for name in ENGINE_METRICS} == ENGINE_METRICS
    assert samples["famserve_states_budget_bytes"] == state_nbytes
    assert samples["famserve_state_bytes"] == state_nbytes
    assert samples["famserve_preemptions_total"] == 0
    buckets = [key for key in samples if key.startswith("famserve_batch_size_bucket")]
    assert 'famserve_batch_size_bucket{le="+Inf"}' in buckets and len(buckets) == 11


def test_counters_move_by_what_one_request_did(http: httpx.Client, state_nbytes: int) -> None:
    before, _ = scrape(http)
    prompt_ids = list(range(10, 23))  # 13 tokens
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt_ids, "max_tokens": 6,
                                                  "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 6
    after, _ = scrape(http)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("famserve_prefill_tokens_total") == 13
    assert grew("famserve_decode_tokens_total") == 6
    assert grew("famserve_fam_updates_total") == (13 + 6 - 1) // FAM.block_size  # the last token is never fed
    assert grew("famserve_engine_steps_total") == grew("famserve_batch_size_count") == 6  # 1 prefill + 5 decode
    assert grew('famserve_batch_size_bucket{le="1.0"}') == 6 and grew("famserve_batch_size_sum") == 6
    assert grew("famserve_request_queue_time_seconds_count") == 1
    assert 0 <= grew("famserve_request_queue_time_seconds_sum") < 5
    assert (after["famserve_num_requests_running"], after["famserve_states_resident"],
            after["famserve_states_resident_bytes"]) == (0, 0, 0)
    assert after["famserve_states_pooled_bytes"] == state_nbytes  # kept for the next request
    assert after["famserve_states_capacity_left"] == 1


def test_a_request_waits_while_the_budget_is_taken(server, http: httpx.Client, state_nbytes: int) -> None:
    long = {"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}
    gave_up: list[type] = []

    def wait_for_a_state() -> None:
        try:
            httpx.post(f"{server.url}/v1/completions", json=long, timeout=4)
        except httpx.ReadTimeout:  # expected: it waits behind the running stream, then gives up
            gave_up.append(httpx.ReadTimeout)

    with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
        lines = response.iter_lines()  # held: a dropped iterator would close the stream (a disconnect)
        assert next(line for line in lines if line.startswith("data: "))
        waiting = threading.Thread(target=wait_for_a_state)
        waiting.start()
        samples = wait_until(http, "famserve_num_requests_waiting", 1)
        # max_running is 32, but the budget holds one state: the second request queues
        assert samples["famserve_num_requests_running"] == 1
        assert samples["famserve_states_resident"] == 1
        assert samples["famserve_states_resident_bytes"] == state_nbytes
        assert samples["famserve_states_capacity_left"] == 0
        waiting.join()
    assert gave_up == [httpx.ReadTimeout]
    samples = wait_until(http, "famserve_num_requests_running", 0)
    assert (samples["famserve_num_requests_waiting"], samples["famserve_states_resident"]) == (0, 0)


def test_session_metrics_follow_evictions_and_loads(http: httpx.Client, state_nbytes: int) -> None:
    before, types = scrape(http)
    assert {name: types.get(name) for name in SESSION_METRICS} == SESSION_METRICS
    assert before["famserve_sessions_budget_bytes"] == state_nbytes
    first = http.post("/v1/sessions", json={}).json()["id"]
    assert http.post(f"/v1/sessions/{first}/append", json={"token_ids": list(range(10, 30))}).status_code == 200
    second = http.post("/v1/sessions", json={}).json()["id"]  # the budget holds one state: the first is evicted
    middle, _ = scrape(http)
    assert http.post(f"/v1/sessions/{first}/append", json={"token_ids": [7]}).status_code == 200  # loaded again
    after, _ = scrape(http)

    def grew(name: str, since: dict[str, float] = before) -> float:
        return after[name] - since[name]

    assert (middle["famserve_sessions_hot"], middle["famserve_sessions_hot_bytes"]) == (1, state_nbytes)
    assert (after["famserve_sessions_hot"], after["famserve_sessions_hot_bytes"]) == (1, state_nbytes)
    assert middle["famserve_session_evictions_total"] - before["famserve_session_evictions_total"] == 1
    assert grew("famserve_session_evictions_total") == 2  # then the second, to make room for the first
    assert grew("famserve_session_snapshots_total") == 1  # only the first had tokens not yet snapshotted
    assert grew("famserve_session_loads_total") == 1
    assert grew("famserve_session_replayed_tokens_total") == 0  # its snapshot held all 20 tokens
    assert http.delete(f"/v1/sessions/{second}").status_code == 200
