"""POST /v1/responses with stream=true against a real server (tiny model, FAM mode), read as raw server-sent events
and through the official openai client: OpenAI's event sequence and shapes, deltas that add up to the final text, a
streamed turn committed exactly as a plain one (previous_response_id continues from it), and errors answered as
OpenAI-shaped HTTP errors before any stream starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from famserve.server.store import FileStore

from server_process import TINY_MODEL_NAME

FAM_ARGS = dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2,
                snapshot_every_tokens=10**9)  # keep every token in the log, so tests can compare what was committed
OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
QUESTIONS = ["hello there", "what is the capital of France?", "and of Spain?"]
GREEDY = dict(model=TINY_MODEL_NAME, temperature=0)
API_KEY = "any"  # the server checks no keys, but sessions still belong to the key a request carries
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("responses")


@pytest.fixture(scope="module")
def server(start_server, tiny_args, state_dir):
    return start_server(tiny_args(state_dir=state_dir, **FAM_ARGS))


@pytest.fixture
def oai(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def committed_tokens(state_dir: Path, session_id: str) -> list[int]:
    store = FileStore(state_dir)
    return store.read_log(store.load_record(session_id))


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) per server-sent event of a streamed response."""
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = r.read().decode().split("\n\n")
    events = []
    for frame in filter(None, (f.strip() for f in frames)):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_stream_is_openais_event_sequence_and_matches_the_plain_response(server):
    body = {**GREEDY, "input": "hello", "max_output_tokens": 12}
    plain = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120).json()
    events = raw_events(server, body)
    names, data = [name for name, _ in events], [d for _, d in events]
    deltas = [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
    assert names == OPENING + ["response.output_text.delta"] * len(deltas) + CLOSING + ["response.incomplete"]
    assert [d["type"] for d in data] == names and [d["sequence_number"] for d in data] == list(range(len(data)))
    assert len(deltas) >= 1 and all(deltas)

    created, in_progress, added, part_added = data[:4]
    text_done, part_done, item_done, final = data[-4:]
    final = final["response"]
    for opening in (created, in_progress):
        assert opening["response"]["status"] == "in_progress" and opening["response"]["output"] == []
        assert opening["response"]["usage"] is None and opening["response"]["id"] == final["id"]
    item_id = added["item"]["id"]
    assert added["item"] == {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                             "content": []}
    assert part_added["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert all(d["item_id"] == item_id and d["output_index"] == 0 and d["content_index"] == 0
               for d in data if "item_id" in d)
    text = "".join(deltas)
    assert text_done["text"] == text and part_done["part"]["text"] == text
    assert item_done["item"] == final["output"][0] and final["output"][0]["status"] == "incomplete"

    # Greedy in a new conversation: the streamed response is the plain one but for ids and timestamps.
    assert final["status"] == plain["status"] == "incomplete"
    assert final["incomplete_details"] == plain["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"] == plain["output"][0]["content"]
    assert final["usage"] == plain["usage"] and final["usage"]["output_tokens"] == 12
    assert final["id"] == f"resp_{final['session_id'].removeprefix('sess_')}_1"


def test_streamed_turns_commit_exactly_what_plain_turns_commit(oai, server, state_dir):
    def converse(stream: bool) -> tuple[str, list[str]]:
        previous, texts = None, []
        for question in QUESTIONS:
            request = dict(**GREEDY, input=question, max_output_tokens=8, previous_response_id=previous)
            if stream:
                events = list(oai.responses.create(**request, stream=True))
                final = events[-1].response
                assert events[0].response.id == final.id
                assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
            else:
                final = oai.responses.create(**request)
            assert final.previous_response_id == previous
            texts.append(final.output_text)
            previous = final.id
        return final.model_extra["session_id"], texts

    plain_session, plain_texts = converse(stream=False)
    streamed_session, streamed_texts = converse(stream=True)
    assert streamed_texts == plain_texts
    assert committed_tokens(state_dir, streamed_session) == committed_tokens(state_dir, plain_session)
    info = httpx.get(f"{server.url}/v1/sessions/{streamed_session}", headers=AUTH).json()
    assert info["turns"] == len(QUESTIONS)


def test_the_stream_helper_gets_a_completed_response_when_a_stop_string_ends_it(oai):
    text = oai.responses.create(**GREEDY, input="hello", max_output_tokens=40).output_text
    stop = re.search(r"[A-Za-z]{2}", text[1:]).group()  # a stop string the greedy text reaches after its start
    with oai.responses.stream(**GREEDY, input="hello", max_output_tokens=40, extra_body={"stop": [stop]}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == deltas == text[:text.index(stop)]


@pytest.fixture(scope="module")
def two_turns(server) -> tuple[str, str]:
    """The response ids of a conversation's first and second (latest) turns."""
    oai = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    first = oai.responses.create(**GREEDY, input="one", max_output_tokens=3)
    second = oai.responses.create(**GREEDY, input="two", max_output_tokens=3, previous_response_id=first.id)
    return first.id, second.id


@pytest.mark.parametrize("change,status,code,param", [
    (lambda first, latest: {"previous_response_id": first}, 409, "response_not_latest", "previous_response_id"),
    (lambda first, latest: {"previous_response_id": latest[:-1] + "9"}, 400, "previous_response_not_found",
     "previous_response_id"),
    (lambda first, latest: {"previous_response_id": "resp_0000unknown_1"}, 400, "previous_response_not_found",
     "previous_response_id"),
    (lambda first, latest: {"previous_response_id": "resp_x"}, 400, "invalid_value", "previous_response_id"),
    (lambda first, latest: {"model": "no-such-model"}, 404, "model_not_found", "model"),
    (lambda first, latest: {"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400,
     "unsupported_parameter", "tools"),
], ids=["older-response", "turn-never-made", "unknown-conversation", "malformed-id", "unknown-model", "tools"])
def test_errors_come_before_the_stream_starts(oai, server, two_turns, change, status, code, param):
    request = {**GREEDY, "input": "three", "max_output_tokens": 3, **change(*two_turns)}
    with pytest.raises(openai.APIStatusError) as caught:
        oai.responses.create(**request, stream=True)
    error = caught.value
    assert (error.status_code, error.code, error.param) == (status, code, param)
    assert error.response.headers["content-type"] == "application/json"
    assert error.body["type"] == "invalid_request_error" and error.body["message"]
    session_id = "sess_" + two_turns[1].removeprefix("resp_").rpartition("_")[0]
    info = httpx.get(f"{server.url}/v1/sessions/{session_id}", headers=AUTH).json()
    assert info["turns"] == 2  # nothing was committed
