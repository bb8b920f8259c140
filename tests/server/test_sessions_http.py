"""Sessions over HTTP against a real server process (tiny model, FAM mode with small blocks): create, ingest, ask,
fork, export/import, list and delete; exact chat through the template, ownership, 409 on concurrent mutation, the
session_id extension and the Responses API through the official openai client (streamed responses:
test_responses_stream.py; the README's walkthrough, restart included: test_readme_walkthrough.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pydantic
import pytest
from openai import OpenAI

from famserve.engine.tokenizer import Tokenizer
from famserve.server.store import FileStore

from server_process import TINY_MODEL_NAME

FAM_ARGS = dict(mode="fam", block_size=8, memory_blocks=1, fam_length=4, sink_tokens=2,
                snapshot_every_tokens=10**9)  # keep every token in the log, so tests can read what was consumed
TEXT = "The pass key is 4217. Remember it.\n" + "The grass is green. The sky is blue.\n" * 120


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="module")
def server(start_server, tiny_args, state_dir):
    return start_server(tiny_args(state_dir=state_dir, api_keys="key-a,key-b", **FAM_ARGS))


def client(server, key="key-a") -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def consumed_tokens(state_dir: Path, session_id: str) -> list[int]:
    store = FileStore(state_dir)
    return store.read_log(store.load_record(session_id))


def greedy_completion(http: httpx.Client, session_id: str, commit: bool = False) -> str:
    r = http.post(f"/v1/sessions/{session_id}/completions",
                  json={"prompt": " Q:", "max_tokens": 12, "temperature": 0, "commit": commit})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_walkthrough_create_ingest_ask_fork_export_import(server, tiny_llama_dir):
    with client(server) as http:
        created = http.post("/v1/sessions", json={"system_prompt": "You answer briefly.", "metadata": {"doc": "t"}})
        assert created.status_code == 200, created.text
        info = created.json()
        sid, start_tokens = info["id"], info["tokens_processed"]
        assert info["object"] == "session" and info["fam"]["mode"] == "fam" and info["metadata"] == {"doc": "t"}
        assert start_tokens > 0  # the system turn went in

        # ingest a long text as a streamed text/plain body, with progress events
        body = (TEXT * 3).encode()
        with http.stream("POST", f"/v1/sessions/{sid}/append?stream=true", content=iter([body[:5000], body[5000:]]),
                         headers={"Content-Type": "text/plain"}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        progress = [json.loads(e) for e in events[:-1]]
        ingested = progress[-1]["tokens_appended"]
        assert ingested == len(Tokenizer.from_hf_folder(tiny_llama_dir).encode(TEXT * 3))
        assert [p["tokens_appended"] for p in progress] == sorted(p["tokens_appended"] for p in progress)
        after = http.get(f"/v1/sessions/{sid}").json()
        assert after["tokens_processed"] == start_tokens + ingested
        assert after["state_bytes"] == info["state_bytes"]  # constant, whatever was read

        # ask without committing: the session does not move
        answer = greedy_completion(http, sid)
        assert http.get(f"/v1/sessions/{sid}").json()["tokens_processed"] == after["tokens_processed"]
        assert greedy_completion(http, sid) == answer

        fork = http.post(f"/v1/sessions/{sid}/fork").json()
        assert fork["tokens_processed"] == after["tokens_processed"] and fork["id"] != sid
        assert greedy_completion(http, fork["id"]) == answer
        http.post(f"/v1/sessions/{fork['id']}/append", json={"text": "Something else entirely."})
        assert greedy_completion(http, sid) == answer  # the source is untouched by its fork

        exported = http.get(f"/v1/sessions/{sid}/state")
        assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"
        imported = http.post("/v1/sessions/import", content=exported.content,
                             headers={"Content-Type": "application/octet-stream"}).json()
        assert imported["tokens_processed"] == after["tokens_processed"]
        assert greedy_completion(http, imported["id"]) == answer

        listed = [s["id"] for s in http.get("/v1/sessions", params={"limit": 100}).json()["data"]]
        assert {sid, fork["id"], imported["id"]} <= set(listed)
        page = http.get("/v1/sessions", params={"limit": 1}).json()
        assert len(page["data"]) == 1 and page["has_more"] is True
        assert http.delete(f"/v1/sessions/{fork['id']}").json() == {"id": fork["id"], "object": "session.deleted",
                                                                    "deleted": True}
        assert http.get(f"/v1/sessions/{fork['id']}").status_code == 404


def test_chat_turns_hold_exactly_the_rendered_conversation(server, state_dir, tiny_llama_dir):
    tokenizer = Tokenizer.from_hf_folder(tiny_llama_dir)
    with client(server) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        conversation = []
        for i, question in enumerate(["hello there", "what is the capital of France?", "and of Spain?"]):
            conversation.append({"role": "user", "content": question})
            body = {"messages": [conversation[-1]], "max_tokens": 6, "temperature": 0}
            if i == 1:  # one turn streamed
                with http.stream("POST", f"/v1/sessions/{sid}/chat/completions", json={**body, "stream": True}) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                reply = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            else:
                r = http.post(f"/v1/sessions/{sid}/chat/completions", json=body)
                assert r.status_code == 200, r.text
                reply = r.json()["choices"][0]["message"]["content"]
            conversation.append({"role": "assistant", "content": reply})
        info = http.get(f"/v1/sessions/{sid}").json()
        assert info["turns"] == 3
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
        assert consumed_tokens(state_dir, sid) == expected
        assert info["tokens_processed"] == len(expected)


def test_a_session_turn_can_be_held_to_a_json_schema(server):
    schema = {"type": "object", "properties": {"key": {"type": "integer", "minimum": 0, "maximum": 9999}},
              "required": ["key"], "additionalProperties": False}
    with client(server) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        assert http.post(f"/v1/sessions/{sid}/append", json={"text": TEXT}).status_code == 200
        r = http.post(f"/v1/sessions/{sid}/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the pass key?"}], "max_tokens": 30, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "key", "schema": schema}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and set(json.loads(choice["message"]["content"])) == {"key"}
        assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 1


def test_another_key_sees_nothing(server):
    with client(server, "key-a") as a, client(server, "key-b") as b:
        sid = a.post("/v1/sessions", json={}).json()["id"]
        for method, path, body in [("GET", f"/v1/sessions/{sid}", None), ("DELETE", f"/v1/sessions/{sid}", None),
                                   ("POST", f"/v1/sessions/{sid}/append", {"text": "x"}),
                                   ("POST", f"/v1/sessions/{sid}/fork", None),
                                   ("GET", f"/v1/sessions/{sid}/state", None),
                                   ("POST", f"/v1/sessions/{sid}/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}]})]:
            r = b.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "session_not_found"
        assert sid not in [s["id"] for s in b.get("/v1/sessions").json()["data"]]
        assert a.get(f"/v1/sessions/{sid}").status_code == 200


def test_concurrent_mutation_gets_409(server):
    with client(server) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        started = threading.Event()
        status: list[int] = []

        def long_turn():
            with client(server) as other:
                with other.stream("POST", f"/v1/sessions/{sid}/chat/completions",
                                  json={"messages": [{"role": "user", "content": "talk"}], "max_tokens": 60,
                                        "stream": True, "ignore_eos": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            started.set()
                    status.append(r.status_code)

        worker = threading.Thread(target=long_turn)
        worker.start()
        assert started.wait(60)
        busy = http.post(f"/v1/sessions/{sid}/append", json={"text": "meanwhile"})
        worker.join(120)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        assert status == [200]
        assert http.post(f"/v1/sessions/{sid}/append", json={"text": "after"}).status_code == 200


def test_session_id_extension_and_responses_api_with_the_openai_client(server):
    oai = OpenAI(base_url=f"{server.url}/v1", api_key="key-a")
    with client(server) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
    reply = oai.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, temperature=0, extra_body={"session_id": sid})
    assert reply.choices[0].finish_reason in ("stop", "length")
    with client(server) as http:
        assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 1

    first = oai.responses.create(model=TINY_MODEL_NAME, input="hello", max_output_tokens=5, temperature=0)
    assert first.status in ("completed", "incomplete") and isinstance(first.output_text, str)
    second = oai.responses.create(model=TINY_MODEL_NAME, input="and then?", previous_response_id=first.id,
                                  max_output_tokens=5, temperature=0)
    session_id = first.model_extra["session_id"]
    assert second.model_extra["session_id"] == session_id and second.id != first.id
    with client(server) as http:
        assert http.get(f"/v1/sessions/{session_id}").json()["turns"] == 2
        stale = http.post("/v1/responses", json={"model": TINY_MODEL_NAME, "input": "x",
                                                 "previous_response_id": first.id})
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "response_not_latest"


class Pass(pydantic.BaseModel):
    key: int = pydantic.Field(ge=0, le=9999)


def test_responses_api_structured_output_through_the_clients_parse_helper(server):
    oai = OpenAI(base_url=f"{server.url}/v1", api_key="key-a")
    parsed = oai.responses.parse(model=TINY_MODEL_NAME, input="What is the pass key?", text_format=Pass,
                                 max_output_tokens=30, temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pass)
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Pass"
    with client(server) as http:
        r = http.post("/v1/responses", json={"model": TINY_MODEL_NAME, "input": "x", "text": {"format": {
            "type": "json_schema", "name": "p", "schema": {"type": "nonsense"}}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.schema", r.text
        plain = http.post("/v1/responses", json={"model": TINY_MODEL_NAME, "input": "x", "max_output_tokens": 2})
        assert plain.json()["text"] == {"format": {"type": "text"}}


@pytest.mark.parametrize("method,path,body,status,code", [
    ("POST", "/v1/sessions/sess_nope/append", {"text": "x"}, 404, "session_not_found"),
    ("GET", "/v1/sessions/not-a-session", None, 404, "session_not_found"),
    ("POST", "/v1/sessions", {"metadata": {"k": 1}}, 400, None),
    ("POST", "/v1/sessions/import", None, 400, "invalid_state"),
    ("POST", "/v1/responses", {"model": TINY_MODEL_NAME, "input": "x", "previous_response_id": "resp_x"}, 400,
     "invalid_value"),
    ("POST", "/v1/sessions/sess_x/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("POST", "/v1/responses", {"model": TINY_MODEL_NAME, "input": [{"role": "tool", "tool_call_id": "c",
                                                                    "content": "x"}]}, 400, "unsupported_parameter"),
])
def test_session_errors(server, method, path, body, status, code):
    with client(server) as http:
        r = http.request(method, path, json=body) if body is not None else http.request(method, path, content=b"junk")
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"]
        if code:
            assert error["code"] == code
