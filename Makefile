# The README's commands call these targets. Everything runs from the repo root inside ./.venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
MLFLOW_PORT ?= 5000

.PHONY: help setup system-deps repro headline test test-fast test-e2e lint format bench verify compare compare-methods mlflow-server \
	clean-venv lock-check doctor recipe gpu-check gpu-bundle chat publish train-worker sky-venv
.DEFAULT_GOAL := help
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)

# List every target with the first line of the comment above it (`make` alone does this too).
help:
	@awk '/^# /{ if (!c) c = substr($$0, 3); next } /^[a-z][a-z0-9-]*:/{ split($$1, t, ":"); if (c) printf "  %-16s %s\n", t[1], c; c = ""; next } { c = "" }' $(MAKEFILE_LIST)

# Install the locked environment into ./.venv (once; again when pyproject.toml or constraints.txt change).
# constraints.txt pins public versions only: torch==2.13.0 is the CUDA build from the public index on a Linux machine (its metadata pins the CUDA libraries), a CPU wheel where one is offered.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Debian packages the end-to-end tests need (a real OpenSSH server for the dvc-ssh remote test).
system-deps:
	@command -v /usr/sbin/sshd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null)
	@test -x /usr/lib/openssh/sftp-server || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-sftp-server >/dev/null)

# The whole pipeline on the current params.yaml (the small profile by default, offline), then its headline.
# validate runs once before DVC too: a params.yaml DVC cannot even fill into dvc.yaml (data.path: "") gets its one-line error instead of DVC's.
repro: setup
	$(PY) -m stages.validate
	dvc repro
	@echo && $(PY) -m tools.headline

# Join a train.num_nodes > 1 run from a node other than node 0: train's inputs (pulled, else reproduced), then the worker.
# SET="train.beta=0.2 ...": the params edits node 0 ran with (dvc exp run -S); docs/scaling.md.
train-worker: setup
	$(PY) -m tools.train_worker $(foreach kv,$(SET),-S $(kv))

# The headline of commits, branches and experiments side by side, paired tests on the held-out documents vs the
# first: make headline REVS="main beta02" (no REVS: the workspace).
headline: setup
	$(PY) -m tools.headline $(REVS)

# Talk to the tuned model (MODEL=base for the base; SYSTEM="..." for a system prompt): Ctrl-D or Ctrl-C quits.
chat: setup
	$(PY) -m tools.chat $(if $(MODEL),--model $(MODEL)) $(if $(SYSTEM),--system "$(SYSTEM)")

# Push the merged model and its card to the model hub (private unless PUBLIC=1; DRY_RUN=1 writes the folder).
# ADAPTER=1: the adapter instead; private unless PUBLIC=1; DRY_RUN=1 writes the exact folder it would upload and says where. Token: HF_TOKEN.
publish: setup
	$(PY) -m tools.publish $(REPO) $(if $(ADAPTER),--adapter) $(if $(DRY_RUN),--dry-run) $(if $(PUBLIC),--public)

SKY_VENV ?= .sky-venv
# SkyPilot, for cloud/*.sky.yaml (docs/scaling.md), in a venv of its own: skypilot pins click<8.2, which the main lock does not allow.
sky-venv: $(SKY_VENV)/.installed
$(SKY_VENV)/.installed:
	test -x $(SKY_VENV)/bin/python || python3 -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install -q 'skypilot==0.14.1'
	touch $@

TEST_WORKERS ?= 2
# The whole test suite but CUDA-only tests (unit, stage, and the slow end-to-end ones), in TEST_WORKERS pytest-xdist workers.
# Whole files per worker (--dist loadfile): a module's fixtures are built once; each worker builds the tiny e2e project once.
test: setup system-deps sky-venv
	$(PY) -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist loadfile

# The tests but the slow end-to-end ones (minutes instead of a quarter of an hour).
test-fast: setup
	$(PY) -m pytest -m "not gpu and not slow" -q

# Only the slow end-to-end tests (real dvc, git, sshd, mlflow server in temporary repos).
test-e2e: setup system-deps
	$(PY) -m pytest -m "slow and not gpu" -q

# Two commits, branches or experiments: their headlines side by side with the paired test on the held-out
# documents, then every metric's difference between their MLflow runs: make compare A=main B=beta02
compare: setup
	$(PY) -m tools.headline $(A) $(B)
	@echo
	$(PY) -m tools.compare $(A) $(B)

# Each preference method (tools/compare_methods.yaml) as a DVC experiment on the current profile, one table.
# ONLY="simpo orpo": those entries only; TABLE_ONLY=1: tabulate the experiments already run on this commit.
compare-methods: setup
	$(PY) -m tools.compare_methods $(if $(ONLY),--only $(ONLY)) $(if $(TABLE_ONLY),--table-only)

# ruff check and ruff format --check over the repo.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# ruff format and ruff check --fix over the repo.
format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The benchmarks (bench/run.py): prepare, tokenize, reference and training figures, side by side.
bench: setup
	$(PY) -m bench.run

# Does constraints.txt resolve for a fresh machine (public index only, none of this machine's pip config)?
lock-check: setup
	$(PY) -m tools.lock_check

# What this machine can run (torch build, GPUs, bf16, bitsandbytes backend, disk, hub token: set or not).
doctor: setup
	$(PY) -m tools.doctor $(PARAMS)

# Switch this work tree to a recipe: make recipe RECIPE=recipes/neuralhermes-2.5.yaml (on a branch).
# Also links DVC's cache into the workspace instead of copying (.dvc/config.local), so a 7B model is on disk
# once, not twice.
recipe:
	cp $(RECIPE) params.yaml
	$(VENV)/bin/dvc config --local cache.type reflink,hardlink,symlink,copy
	@echo "params.yaml is now $(RECIPE); run: make doctor && dvc repro"

# The GPU check: the 7B recipe's settings on a Mistral-7B-shaped model on this machine's GPU (5-8 min on an H100).
# Writes metrics/gpu_check.json. DRY_RUN=1: the same path on the CPU with a tiny model. Uses .venv when there
# is one, else the machine's python3 with .gpu-bundle/ (make gpu-bundle) on PYTHONPATH.
gpu-check:
	PYTHONPATH=$(CURDIR)/.gpu-bundle$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check $(if $(DRY_RUN),--dry-run)

# Pack trl, bitsandbytes (CUDA 13 library only) and lm-eval at the locked versions into .gpu-bundle/ (< 64 MiB)
# for a GPU machine whose Python has torch, transformers, peft and accelerate but no network: under 64 MiB.
gpu-bundle:
	$(GPU_PY) -m tools.gpu_bundle .gpu-bundle

# Re-hash the workspace outputs and the local DVC cache against dvc.lock; name every bad file.
verify: setup
	$(PY) -m tools.verify

# A tracking server on loopback over the store `dvc repro` records into (./mlflow.db, artifacts in ./mlruns).
# The first `make mlflow-server` after `make repro` shows its runs; runs sent to the server land in the same store.
mlflow-server: setup
	mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlruns

# Remove ./.venv (the next target that needs it reinstalls).
clean-venv:
	rm -rf $(VENV)
