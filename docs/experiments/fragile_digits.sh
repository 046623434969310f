#!/usr/bin/env bash
# Reproduces docs/fragile_features.md's digits run: the 11 rows of the fragile-features paper's
# Table 2 (configs/fragile/digits: ResNet-20 width 1, eps 32 of 255, 400 steps from scratch,
# 160 of fine-tuning, 60 of BN statistics), evaluated on the 300 held-out digits with a reduced
# AutoAttack-style ensemble and PGD-20, then the folded-BN analysis of NORMAL, ADV and BN PARAMS.
# About 40 minutes on 2 CPU cores. Models go to models/fragile_digits (the configs' model_dir).
# Run from the repository root: bash docs/experiments/fragile_digits.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/fragile_digits}
$PY -m madry_ns.fragile configs/fragile/digits --output "$OUT" \
  --num_robust_examples 300 --aa_steps 20 --aa_targets 3 --aa_queries 300 \
  --pgd_steps 20 --pgd_step_size 4
mkdir -p docs/fragile
cp "$OUT"/table.md "$OUT"/table.json docs/fragile/
cp "$OUT"/bn_analysis/{summary.json,bn_layers.csv,mean_m_per_layer.png,hist_layer_00.png,hist_layer_07.png} docs/fragile/
