#!/usr/bin/env bash
# The pipeline on a SkyPilot node: the `run:` of every cloud/*.sky.yaml (docs/scaling.md). It runs as is on any
# machine with a clone of the repo, the installed venv and the remotes' credentials (tests/e2e/test_cloud.py runs
# it against an SSH git + DVC remote).
#   PARAMS    the params edits of this run, in `dvc exp run -S` syntax: "train.beta=0.2 train.max_steps=400"
#   EXP_NAME  the experiment's name (empty: DVC picks one)
# Node 0 (SKYPILOT_NODE_RANK unset or 0): `dvc exp run --pull --allow-missing` (each stage that must run pulls
# the inputs it reads from the default DVC remote; a stage whose outputs the remote holds is skipped, not
# pulled), then `dvc exp push origin` (the experiment's git ref to origin, its outputs to the DVC remote).
# Any other node of a multi-node task: the same params edits, train's inputs, then the train worker
# (tools/train_worker.py), which joins node 0's rendezvous at the first of SKYPILOT_NODE_IPS.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
overrides=()
for kv in ${PARAMS:-}; do overrides+=(-S "$kv"); done
if [ "${SKYPILOT_NODE_RANK:-0}" != 0 ]; then
  exec python -m tools.train_worker "${overrides[@]}"
fi
name=()
if [ -n "${EXP_NAME:-}" ]; then name=(-n "$EXP_NAME"); fi
dvc exp run --pull --allow-missing "${name[@]}" "${overrides[@]}"
dvc exp push origin ${EXP_NAME:+"$EXP_NAME"}
