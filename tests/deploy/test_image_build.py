"""The Docker image really builds on this kind of machine and its entrypoint serves (slow: several minutes).

No Docker engine runs here and `podman run` cannot (the sandbox refuses setrlimit), so, as docs/deploy.md describes:
  1. a Debian base comes from debootstrap, imported into podman (no registry needed);
  2. python-base.Containerfile adds Python 3.11 to it: the local stand-in for python:3.11-slim, keeping the
     Dockerfile free of test-only branches;
  3. the Dockerfile is built with that BASE and the host's CPU torch wheel (the default torch index is not reachable);
  4. a container is created and its (writable) root filesystem mounted; the image's entrypoint runs in it with chroot,
     as the image's user and with the image's environment, on a loopback port; /ready, one completion with the
     baked default model and the image's HEALTHCHECK command must pass, and SIGTERM must shut it down cleanly.
Skipped only when podman or debootstrap is missing and cannot be installed (no root or no apt-get)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_files import REPO

pytestmark = pytest.mark.slow

DEBIAN_IMAGE = "localhost/debian:bookworm"
PYTHON_IMAGE = "localhost/famserve-python:3.11"
IMAGE = "localhost/famserve:slow-test"
PYTHON_BASE_FILE = Path(__file__).with_name("python-base.Containerfile")
APT_TIMEOUT_S = 900
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1800
LISTEN_TIMEOUT_S = 120  # until /health answers: imports (torch, transformers) from a cold page cache
READY_TIMEOUT_S = 300  # until /ready: loading the model as well
STOP_TIMEOUT_S = 60


@dataclass
class BuiltImage:
    name: str
    config: dict  # the image's OCI/Docker config: Env, User, Entrypoint, ...
    healthcheck: dict | None
    phase_s: dict[str, float]  # seconds per build phase


def _run(args: list[str], timeout_s: float, log: Path, **kwargs: object) -> None:
    """Run a command with its output in `log`; on failure, fail the test with the end of that output."""
    with open(log, "wb") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} ... exited {result.returncode}:\n{log.read_text(errors='replace')[-4000:]}")


def _ensure_tools() -> None:
    """podman and debootstrap, installed from apt when missing; skip if that is impossible here."""
    missing = [tool for tool in ("podman", "debootstrap")
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{' and '.join(missing)} missing, and apt-get cannot install them here (needs root and apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "podman", "debootstrap"]
    if subprocess.run(install, env=env, capture_output=True, timeout=APT_TIMEOUT_S, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=APT_TIMEOUT_S,
                       check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                                check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot install podman and debootstrap: {result.stderr[-500:]}")


def _image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], timeout=60, check=False).returncode == 0


def _host_ca_bundle() -> Path:
    """The CA bundle the host's pip trusts (where HTTPS is intercepted it holds the proxy's CA)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    from pip._vendor import certifi

    return Path(certifi.where())


def _torch_wheel(folder: Path) -> Path | None:
    """The host's torch as a wheel (a local CPU wheel on these machines), or None to use the Dockerfile's index."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                             "--dest", str(folder), f"torch=={version}"], capture_output=True, timeout=600,
                            check=False)
    wheels = sorted(folder.glob("torch-*.whl"))
    return wheels[0] if result.returncode == 0 and wheels else None


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    _ensure_tools()
    work = tmp_path_factory.mktemp("image")
    phase_s: dict[str, float] = {}

    started = time.monotonic()
    if not _image_exists(DEBIAN_IMAGE):  # kept between runs: debootstrap takes a minute or two
        rootfs = work / "rootfs"
        try:
            _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                 DEBOOTSTRAP_TIMEOUT_S, log=work / "debootstrap.log")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            _run(["podman", "import", "-", DEBIAN_IMAGE], 600, log=work / "import.log", stdin=tar.stdout)
            assert tar.wait(timeout=60) == 0
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    phase_s["debian base"] = time.monotonic() - started

    started = time.monotonic()
    context = work / "python-base"
    context.mkdir()
    shutil.copy(_host_ca_bundle(), context / "ca-certificates.crt")
    _run(["podman", "build", "--isolation=chroot", "--format=docker", "--build-arg", f"DEBIAN={DEBIAN_IMAGE}",
          "-t", PYTHON_IMAGE, "-f", str(PYTHON_BASE_FILE), str(context)], BUILD_TIMEOUT_S, log=work / "base.log")
    phase_s["python base"] = time.monotonic() - started

    started = time.monotonic()
    wheels = work / "wheels"
    wheels.mkdir()
    wheel = _torch_wheel(wheels)
    torch_args = [] if wheel is None else [
        "--volume", f"{wheels}:/wheels:ro",
        "--build-arg", f"TORCH_SPEC=torch @ file:///wheels/{wheel.name}",
        "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",  # for torch's own dependencies
    ]
    _run(["podman", "build", "--isolation=chroot", "--format=docker", "--build-arg", f"BASE={PYTHON_IMAGE}",
          *torch_args, "-t", IMAGE, str(REPO)], BUILD_TIMEOUT_S, log=work / "build.log")
    phase_s["famserve image"] = time.monotonic() - started
    print(f"\nimage build phases (s): {', '.join(f'{k} {v:.0f}' for k, v in phase_s.items())}")

    inspected = json.loads(subprocess.run(["podman", "image", "inspect", IMAGE], capture_output=True, check=True,
                                          timeout=60).stdout)[0]
    healthcheck = inspected.get("Healthcheck") or inspected.get("HealthCheck")  # the key's case varies by version
    return BuiltImage(IMAGE, inspected["Config"], healthcheck, phase_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningImage:
    url: str
    process: subprocess.Popen
    root: str  # the container's root filesystem, mounted
    env: dict[str, str]
    userspec: str
    log: Path


@pytest.fixture
def running_image(built_image: BuiltImage, tmp_path: Path) -> Iterator[RunningImage]:
    config = built_image.config
    port = _free_port()
    env = dict(item.split("=", 1) for item in config["Env"])
    env.update(FAMSERVE_HOST="127.0.0.1", FAMSERVE_PORT=str(port))  # loopback only, on a free port
    container = subprocess.run(["podman", "create", "--no-healthcheck", built_image.name], capture_output=True,
                               text=True, check=True, timeout=120).stdout.strip()
    process: subprocess.Popen | None = None
    log = tmp_path / "server.log"
    try:
        root = subprocess.run(["podman", "mount", container], capture_output=True, text=True, check=True,
                              timeout=120).stdout.strip()
        userspec = config["User"]
        command = [shutil.which("chroot") or "/usr/sbin/chroot", f"--userspec={userspec}", root,
                   "/usr/bin/env", f"--chdir={config.get('WorkingDir') or '/'}", *config["Entrypoint"],
                   *(config.get("Cmd") or [])]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        yield RunningImage(f"http://127.0.0.1:{port}", process, root, env, userspec, log)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        subprocess.run(["podman", "umount", container], capture_output=True, timeout=120, check=False)
        subprocess.run(["podman", "rm", "--force", container], capture_output=True, timeout=120, check=False)


def _wait_for(server: RunningImage, path: str, timeout_s: float) -> float:
    """Seconds from now until GET `path` answers 200; fails the test if the server exits or time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}{path}", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{path} did not answer 200 within {timeout_s} s:\n{server.log.read_text()[-4000:]}")


def test_image_config(built_image: BuiltImage) -> None:
    config = built_image.config
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["famserve", "serve"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/var/lib/famserve" in config["Volumes"]
    assert env["FAMSERVE_HOST"] == "0.0.0.0"
    assert env["FAMSERVE_STATE_DIR"] == "/var/lib/famserve"
    assert built_image.healthcheck is not None and "/health" in " ".join(built_image.healthcheck["Test"])


def test_entrypoint_serves_a_completion_with_the_baked_model(running_image: RunningImage,
                                                              built_image: BuiltImage) -> None:
    server = running_image
    listening_s = _wait_for(server, "/health", LISTEN_TIMEOUT_S)  # liveness: answers before the model is loaded
    ready_s = listening_s + _wait_for(server, "/ready", READY_TIMEOUT_S)
    print(f"\n/health after {listening_s:.1f} s, /ready after {ready_s:.1f} s")

    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert [model["id"] for model in models] == ["smollm2-135m"]
    response = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 8
    assert "Paris" in body["choices"][0]["text"]  # greedy SmolLM2-135M-Instruct: " Paris.\n\nThe answer is:"

    # The image's own HEALTHCHECK command, run inside the image as its user.
    test = built_image.healthcheck["Test"]
    assert test[0] == "CMD"
    check = subprocess.run([shutil.which("chroot") or "/usr/sbin/chroot", f"--userspec={server.userspec}",
                            server.root, *test[1:]], env=server.env, capture_output=True, text=True, timeout=30,
                           check=False)
    assert check.returncode == 0, check.stderr

    # SIGTERM (docker stop, a pod's deletion) shuts the server down cleanly within the grace period. Its exit status
    # is the graceful-shutdown test's business (tests/server), not the image's.
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=STOP_TIMEOUT_S)
    assert "Application shutdown complete" in server.log.read_text()
