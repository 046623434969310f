#!/usr/bin/env bash
# Trains the four models of docs/shaping_digits.md (its table came from this script at commit
# 75447d4) and makes docs/evaluation_digits.md: Madry PGD, shaping PGD, TRADES
# and shaping TRADES trained on the offline digits data with the same budget and seed
# (configs/quickstart.json: narrow WRN, 200 steps of batch 64, eps 32 of 255, PGD-7 step 8),
# each evaluated by the evaluation suite on the first 200 held-out digits under BN, PN and BN+Shaping
# 1:9 inference. Attack budgets are cut to fit two CPU cores (CW 5 x 100 steps, APGD 20 steps
# with 3 targets, Square 300 queries, EOT over 5 draws; sanity: 3x steps, 2 starts); the rest are
# the suite's defaults. Cost on 2026-11-30, with this 2-core host throttled to a 57 GFLOP/s matmul
# peak (about 1/7 of its usual): 17.5 min to train the first model, 17 min for its first nine
# suite rows (CW alone 8 min); EOT, AutoAttack on the 10x-wide shaped forward and the sanity checks
# cost more. The suite rewrites results.md after every attack, so a stopped run keeps its rows.
# Run from the repository root: bash docs/experiments/shaping_digits.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/shaping_digits}
CONFIG=configs/quickstart.json
declare -A METHOD=(
  [madry]=""
  [shaping_madry]="--set shaping_ratio=3"
  [trades]="--set training_method=trades"
  [shaping_trades]="--set training_method=trades --set shaping_ratio=3"
)
BUDGET="--num_examples 200 --cw_steps 100 --apgd_steps 20 --apgd_targets 3 --square_queries 300 --eot_samples 5 --sanity_step_factor 3 --sanity_restarts 1"
for run in madry shaping_madry trades shaping_trades; do
  $PY train.py --config $CONFIG --set model_dir="$OUT/$run" ${METHOD[$run]}
  $PY -m madry_ns.evaluate --config $CONFIG --set model_dir="$OUT/$run" ${METHOD[$run]} \
    $BUDGET --output "$OUT/$run/suite"
done
