#!/usr/bin/env bash
# Trains the four models of docs/shaping_digits.md (its table came from this script at commit
# 75447d4) and makes the numbers of docs/evaluation_digits.md: Madry PGD, shaping PGD, TRADES
# and shaping TRADES trained on the offline digits data with the same budget and seed
# (configs/quickstart.json: narrow WRN, 200 steps of batch 64, eps 32 of 255, PGD-7 step 8),
# each evaluated by the evaluation suite on the first 100 held-out digits under BN, PN and
# BN+Shaping 1:9 inference (Tables I and II; each suite's results.md/.json are copied into
# docs/evaluation/), then the Table IV grid of the two PGD models and each shaping model
# against its baseline image by image. Attack budgets are cut to fit two throttled CPU cores:
# CW 5 x 50 steps, APGD 10 steps with 1 target class, Square 100 queries, EOT over 3 draws;
# sanity: 2x steps, 2 starts. The rest are the suite's defaults. Measured cost on 2026-11-30
# (host throttled to a 57-79 GFLOP/s matmul peak, about 1/7 of its usual): 13-17.5 min to
# train each model, 24-31 min per suite (times per attack in each results.md), the ablation
# 23 min. The suite saves its table after every attack and --resume continues a
# stopped one (a finished one is left alone), so running this script again finishes whatever
# is missing.
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
BUDGET="--num_examples 100 --cw_steps 50 --apgd_steps 10 --apgd_targets 1 --square_queries 100 --eot_samples 3 --sanity_step_factor 2 --sanity_restarts 1"
for run in madry shaping_madry trades shaping_trades; do
  $PY train.py --config $CONFIG --set model_dir="$OUT/$run" ${METHOD[$run]}
  $PY -m madry_ns.evaluate --config $CONFIG --set model_dir="$OUT/$run" ${METHOD[$run]} \
    $BUDGET --output "$OUT/$run/suite" --resume
done
# The paper's Table IV layout on the two PGD models (training 1:0 = Madry, 1:3 = shaping) under
# the inference ratios 1:0 ... 1:49; skipped once written (it has no --resume).
if [ ! -f "$OUT/ablation/ablation.json" ]; then
  $PY -m madry_ns.evaluate ablation --config $CONFIG --num_examples 100 \
    --checkpoints "$OUT/madry" "$OUT/shaping_madry" --labels "madry 1:0" "shaping 1:3" \
    --output "$OUT/ablation"
fi
# Each shaping model against its baseline, image by image (cheap: reads the suites' files).
$PY -m madry_ns.evaluate compare "$OUT/madry/suite" "$OUT/shaping_madry/suite" \
  --names madry shaping_madry --output "$OUT/compare_madry"
$PY -m madry_ns.evaluate compare "$OUT/trades/suite" "$OUT/shaping_trades/suite" \
  --names trades shaping_trades --output "$OUT/compare_trades"
