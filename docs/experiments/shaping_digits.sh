#!/usr/bin/env bash
# Reproduces docs/shaping_digits.md: Madry PGD, shaping PGD, TRADES and shaping TRADES trained
# on the offline digits data with the same budget and seed (configs/quickstart.json: narrow
# WRN, 200 steps of batch 64, eps 32 of 255, PGD-7 step 8), each evaluated on the 300 held-out
# digits under PN, BN and BN+Shaping inference, with PGD-7 generated three ways for shaping.
# Run from the repository root: bash docs/experiments/shaping_digits.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/shaping_digits}
declare -A METHOD=(
  [madry]=""
  [shaping_madry]="--set shaping_ratio=3"
  [trades]="--set training_method=trades"
  [shaping_trades]="--set training_method=trades --set shaping_ratio=3"
)
EVALS=(
  "--set inference_bn=population"
  "--set inference_bn=batch"
  "--set inference_bn=shaped --set eval_attack_bn=population"
  "--set inference_bn=shaped"
  "--set inference_bn=shaped --set inference_references=fixed"
)
for run in madry shaping_madry trades shaping_trades; do
  $PY train.py --config configs/quickstart.json --set model_dir="$OUT/$run" ${METHOD[$run]}
  for e in "${EVALS[@]}"; do
    $PY eval.py --once --config configs/quickstart.json --set model_dir="$OUT/$run" \
      ${METHOD[$run]} $e > /dev/null
  done
done
$PY -m madry_ns.analysis table "$OUT"/{madry,shaping_madry,trades,shaping_trades}/eval/metrics.jsonl
