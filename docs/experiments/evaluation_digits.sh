#!/usr/bin/env bash
# Reproduces docs/evaluation_digits.md: the evaluation suite (python -m madry_ns.evaluate) on the
# four digits models of docs/experiments/shaping_digits.sh (run that first), and the Table IV
# ablation on models trained at the ratios 1:1, 1:2, 1:3 and 1:7 (1:3 is shaping_madry).
# Attack budgets are cut to fit two CPU cores (CW 5 x 100 steps, APGD 20 steps with 3 targets,
# Square 300 queries, EOT over 5 draws); everything else is the suite's default.
# Run from the repository root: bash docs/experiments/evaluation_digits.sh
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
BUDGET="--cw_steps 100 --apgd_steps 20 --apgd_targets 3 --square_queries 300 --eot_samples 5"
for run in madry shaping_madry trades shaping_trades; do
  $PY -m madry_ns.evaluate --config $CONFIG --set model_dir="$OUT/$run" ${METHOD[$run]} \
    $BUDGET --output "$OUT/$run/suite"
done
for ratio in 1 2 7; do
  $PY train.py --config $CONFIG --set model_dir="$OUT/ratio_$ratio" --set shaping_ratio=$ratio
done
$PY -m madry_ns.evaluate ablation --config $CONFIG --checkpoints "$OUT/ratio_1" "$OUT/ratio_2" \
  "$OUT/shaping_madry" "$OUT/ratio_7" --labels 1:1 1:2 1:3 1:7 --output "$OUT/ablation"
