# Two commands on a fresh machine: `make demo` (install, train the tiny default, sample) and
# `make test`. Everything installs into .venv from the package index; nothing else downloads.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
CONFIG ?= configs/did_tiny.py
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 3
# pytest-xdist workers; each test file stays on one worker (files share fixtures and cached
# compilations). 2 matches CI's 2 cores: 15 min instead of 20 on a cold compilation cache.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast bench bench-torch did-toy did-hmm did-hmm-map trims-toy decoding clean

$(VENV)/.installed: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m dlm_jax.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m dlm_jax.evaluate --workdir=$(WORKDIR) --num_batches=8
	$(PY) -m dlm_jax.sample --workdir=$(WORKDIR) --num_samples=4

test: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/did.py

# Toy reproductions (tables, JSON and plots into benchmarks/results/).
did-toy: install
	$(PY) benchmarks/did_toy.py
# DID vs MDLM on HMM-16 (exact likelihood): 4 arms x 3 seeds x 3,000 steps, then the report
# (~70 min on lightly loaded 2 cores, ~4 h contended: above the issue's 40 min; resumable, stored pieces skipped);
# did-hmm-map adds the 10,000-step runs of the map (checkpoints at 1k / 3k / 10k).
did-hmm: install
	$(PY) benchmarks/did_hmm.py
did-hmm-map: install
	$(PY) benchmarks/did_hmm.py --budget=10000
trims-toy: install
	$(PY) benchmarks/trims_toy.py
decoding: install
	$(PY) benchmarks/decoding.py

# PyTorch baseline for benchmarks/train_throughput.py, in its own venv (never in the default
# install: the PyPI torch wheel pulls in ~3 GB of CUDA libraries even for CPU use).
bench-torch: install
	@test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q "setuptools>=77" torch numpy
	$(PY) benchmarks/train_throughput.py --torch_python=.venv-torch/bin/python

clean:
	rm -rf $(VENV) workdirs .pytest_cache
