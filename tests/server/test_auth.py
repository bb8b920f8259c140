"""API keys (from the environment and from a file; every route but /health and /ready needs one, /metrics too unless
metrics_open) and the request timeout (504 before the answer starts, one error event then [DONE] once a stream has
begun), on servers of their own."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "tiny-llama"
ENV_KEY, FILE_KEY = "env-key-5f2c9a", "file-key-81d07e"
TIMEOUT_S = 1.0
ORIGIN = "http://ui.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(start_server, tiny_args, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# famserve keys\n{FILE_KEY}\n\n")
    return start_server(tiny_args(api_key_file=key_file, request_timeout_s=TIMEOUT_S, max_tokens_cap=4096,
                                  cors_origins=ORIGIN),
                        env={"FAMSERVE_API_KEYS": f"{ENV_KEY}, another-key"})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ({"Authorization": "Bearer"}, "missing_api_key"),
    (bearer("wrong-key"), "invalid_api_key"),
    (bearer(ENV_KEY + "x"), "invalid_api_key"),
])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                              ("GET", "/metrics"), ("GET", "/openapi.json"),
                                              ("POST", "/no/such/route")])
def test_requests_without_a_valid_key_get_401(server, method: str, path: str, headers: dict, code: str) -> None:
    response = httpx.request(method, server.url + path, headers=headers, json=CHAT)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "authentication_error",
                                        "param": None, "code": code}


@pytest.mark.parametrize("key", [ENV_KEY, "another-key", FILE_KEY])
def test_each_configured_key_is_accepted(server, key: str) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=bearer(key), json=CHAT, timeout=30)
    assert response.status_code == 200, response.text
    assert httpx.get(f"{server.url}/metrics", headers=bearer(key)).status_code == 200


def test_openai_client_with_key(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=FILE_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_need_no_key(server, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 200


@pytest.fixture(scope="module")
def open_metrics_server(start_server, tiny_args):
    return start_server(tiny_args(metrics_open="true"), env={"FAMSERVE_API_KEYS": ENV_KEY})


def test_metrics_open_serves_metrics_without_a_key_and_nothing_else(open_metrics_server) -> None:
    url = open_metrics_server.url
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200
    assert "famserve_requests_total" in metrics.text
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/openapi.json")]:
        assert httpx.request(method, url + path, json=CHAT).status_code == 401
    spec = httpx.get(f"{url}/openapi.json", headers=bearer(ENV_KEY)).json()
    assert spec["paths"]["/metrics"]["get"]["security"] == []
    assert spec["paths"]["/v1/models"]["get"].get("security") is None  # the global bearer requirement applies


def test_openapi_documents_bearer_auth(server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", headers=bearer(ENV_KEY)).json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["security"] == [{"bearer": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/metrics"]["get"]  # metrics_open is off: /metrics needs a key


def test_cors_preflight_needs_no_key_and_names_the_origin(server) -> None:
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    response = httpx.options(f"{server.url}/v1/chat/completions", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={**headers, "Origin": "http://evil.example"})
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(base_url: str) -> None:
    response = httpx.get(f"{base_url}/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_request_timeout_before_the_answer_is_504(server) -> None:
    body = {**CHAT, "max_tokens": 4000, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=bearer(ENV_KEY), json=body, timeout=30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    assert response.json()["error"]["type"] == "server_error"


def test_error_after_the_stream_began_is_one_event_then_done(server) -> None:
    body = {**CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=bearer(ENV_KEY), json=body,
                      timeout=30) as response:
        assert response.status_code == 200
        events = response.read().decode()[:-2].split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert error == {"error": {"message": f"the request ran longer than this server's limit of {TIMEOUT_S:g} s",
                               "type": "server_error", "param": None, "code": "request_timeout"}}
    assert all('"error"' not in event for event in events[:-2])
    assert len(events) > 3  # role chunk and content came first


def test_keys_never_reach_the_log(server) -> None:
    log = server.log_text()
    assert "GET /metrics" in log  # the access log is on: requests were logged, keys were not
    for key in (ENV_KEY, FILE_KEY, "another-key", "wrong-key"):
        assert key not in log
