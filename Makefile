# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned here (the CPU build on this machine's disk); the package metadata keeps a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,app,mpi,deepspeed]"
	@touch $(STAMP)

install: $(STAMP)

## The whole suite: unit, real multi-process (gloo) and end-to-end tests.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest

## Without the slow end-to-end tests.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

## A small FSAM fine-tuning run on this machine's CPU.
demo: $(STAMP)
	$(PY) -m fsam_dist.demo

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bench.select

clean:
	rm -rf $(VENV) .demo
