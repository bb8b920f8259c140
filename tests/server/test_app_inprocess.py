"""create_app in process (Starlette's TestClient runs the lifespan): an app serving an already-loaded model, and two
apps side by side, each with its own metrics registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from famserve.server.app import create_app, load_model_from_settings
from famserve.server.settings import Settings


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path):
    return load_model_from_settings(Settings(model=str(tiny_llama_dir)))


def test_two_apps_serve_one_loaded_model_each_with_its_own_metrics(loaded, tiny_llama_dir: Path) -> None:
    settings = Settings(model=str(tiny_llama_dir), served_model_name="tiny", max_tokens_cap=8)
    with TestClient(create_app(settings, loaded)) as first, TestClient(create_app(settings, loaded)) as second:
        for client in (first, second):
            assert client.get("/ready").status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "ignore_eos": True}
        assert first.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3
        ok = 'famserve_requests_total{route="/v1/chat/completions",status="200"} 1.0'
        assert ok in first.get("/metrics").text
        assert ok not in second.get("/metrics").text
