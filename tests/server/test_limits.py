"""Limits and cancellation on a server with one engine slot and one queue place, in full-attention mode (so a request
can outgrow the preallocated context): 400 context_length_exceeded, 429 with Retry-After, and a client that goes
away frees its slot at once, streaming or not; and on a server with a request timeout, a generation that runs past
it frees its slot at once too."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

MODEL = "tiny-llama"
FULL_CONTEXT_TOKENS = 2048  # the tiny model generates about 500 tokens/s here: a full context takes ~4 s
FREED_WITHIN_S = 1.0
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(start_server, tiny_args):
    return start_server(tiny_args(mode="full", full_context_tokens=FULL_CONTEXT_TOKENS, block_size=256,
                                  max_tokens_cap=4096, max_running=1, max_waiting=1))


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


LONG = {"model": MODEL, "prompt": "Hello", "max_tokens": FULL_CONTEXT_TOKENS - 8, "ignore_eos": True}


def gauge(http: httpx.Client, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.MULTILINE).group(1))


def wait_for_gauge(http: httpx.Client, name: str, value: float, timeout_s: float) -> float:
    """Seconds until the gauge reads `value`; fails after timeout_s."""
    started = time.monotonic()
    while gauge(http, name) != value:
        assert time.monotonic() - started < timeout_s, f"{name} did not reach {value} within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_context_length_exceeded(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={**LONG, "max_tokens": FULL_CONTEXT_TOKENS})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None,
                                                              "context_length_exceeded")
    assert f"full attention holds {FULL_CONTEXT_TOKENS} tokens" in error["message"]


def test_queue_full_is_429_with_retry_after(http: httpx.Client) -> None:
    # Three choices for one slot and one queue place: the third cannot be queued, and the whole request fails.
    response = http.post("/v1/completions", json={**LONG, "n": 3})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("rate_limit_error", None, "queue_full")
    wait_for_gauge(http, "famserve_num_requests_running", 0, FREED_WITHIN_S)  # the admitted choices were aborted


def test_a_refused_stream_gets_a_plain_429(server, http: httpx.Client) -> None:
    """The status line of a stream waits for its first token, so a refusal is still an HTTP error, not an event."""
    gave_up: list[type] = []

    def wait_in_queue() -> None:
        try:
            httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=3)
        except httpx.ReadTimeout:  # expected: it waits behind the running stream, then gives up
            gave_up.append(httpx.ReadTimeout)

    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}):  # holds the one slot
            waiting = threading.Thread(target=wait_in_queue)
            waiting.start()
            wait_for_gauge(http, "famserve_num_requests_waiting", 1, 5.0)  # holds the one queue place
            response = http.post("/v1/completions", json={**LONG, "stream": True})
            assert response.status_code == 429
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == "queue_full"
            waiting.join()
    assert gave_up == [httpx.ReadTimeout]
    wait_for_gauge(http, "famserve_num_requests_running", 0, FREED_WITHIN_S)


def test_stream_disconnect_frees_the_slot(server, http: httpx.Client) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert gauge(http, "famserve_num_requests_running") == 1
    # the stream is closed after one event, long before its ~1000 tokens are generated
    wait_for_gauge(http, "famserve_num_requests_running", 0, FREED_WITHIN_S)
    generated = gauge(http, "famserve_generation_tokens_total")
    time.sleep(0.2)
    assert gauge(http, "famserve_generation_tokens_total") == generated
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200  # the slot serves again


def test_non_streamed_disconnect_frees_the_slot(server, http: httpx.Client) -> None:
    outcome: list[BaseException] = []

    def request_and_give_up() -> None:
        try:
            httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=0.5)
        except httpx.ReadTimeout as exc:  # expected: the client gives up after 0.5 s
            outcome.append(exc)

    thread = threading.Thread(target=request_and_give_up)
    thread.start()
    wait_for_gauge(http, "famserve_num_requests_running", 1, 5.0)
    thread.join()
    assert [type(e) for e in outcome] == [httpx.ReadTimeout]
    wait_for_gauge(http, "famserve_num_requests_running", 0, FREED_WITHIN_S)


@pytest.fixture(scope="module")
def timeout_server(start_server, tiny_args):
    return start_server(tiny_args(request_timeout_s=TIMEOUT_S, max_tokens_cap=4096, max_running=1, max_waiting=1))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_request_timeout_frees_the_slot(timeout_server, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=timeout_server.url, timeout=30) as client:
        response = client.post("/v1/completions", json=body)  # ~8 s of tokens, cut at TIMEOUT_S
        if stream:
            assert response.status_code == 200
            assert '"code":"request_timeout"' in response.text and response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "request_timeout"
        wait_for_gauge(client, "famserve_num_requests_running", 0, FREED_WITHIN_S)
        decoded = gauge(client, "famserve_decode_tokens_total")
        time.sleep(0.2)
        assert gauge(client, "famserve_decode_tokens_total") == decoded  # the engine stopped generating for it
        assert client.post("/v1/completions", json={**body, "max_tokens": 2, "stream": False}).status_code == 200
