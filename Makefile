# Every target does its own set-up, idempotently: a fresh clone needs only `make demo`
# or `make test`. Set-up is recorded by stamp files so repeated runs skip it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
SYSDEPS := libopencv-dev libturbojpeg0-dev pkg-config
# Only for the tests: a one-node Slurm on localhost runs a real `dbd sweep --slurm` array
# (tests/sweep/test_slurm_cluster.py, skipped with its reason where these are missing).
TEST_SYSDEPS := slurmctld slurmd slurm-client munge
# One pytest-xdist worker more than there are cores: a worker waiting on a launcher, a
# timeout or a subprocess's start leaves its core to the extra one (2 cores: 13 min 45 s
# of pytest against 14 min 50 s with 2 workers, 2026-12-07). tests/conftest.py pins each
# worker to one core, so every test process still runs one thread per core it may use.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
DEMO_DATA := data/digits
DEMO_RUN := runs/demo

.PHONY: setup sysdeps test-sysdeps demo test lint bench clean

setup: $(STAMP)

sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "FFCV needs the Debian packages:$$missing. As root run: apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

test-sysdeps:
	@missing=""; for p in $(TEST_SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages for the tests:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "could not install$$missing: the local-Slurm test will be skipped" >&2; \
	  else \
	    echo "not root: the local-Slurm test will be skipped (it needs:$$missing)" >&2; \
	  fi; \
	fi

$(STAMP): constraints.txt pyproject.toml | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, alone: the pinned build comes from the local cache in under a minute
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt numpy cython
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

demo: setup
	@test -f $(DEMO_DATA)/meta.json || $(VENV)/bin/dbd prepare digits --out $(DEMO_DATA)
	$(VENV)/bin/dbd run configs/demo/digits_badnets_dbd.yaml run_dir=$(DEMO_RUN)

lint: setup
	$(VENV)/bin/ruff check .

test: setup test-sysdeps
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

bench: setup
	$(PY) -m benchmarks --out benchmarks/results

clean:
	rm -rf runs data/digits .pytest_cache
