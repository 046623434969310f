#!/usr/bin/env bash
# Reproduces docs/rna_digits.md: an RNA ResNet-18 (width 8, BN/IN per layer) and the same network
# with plain BN, both adversarially trained the released way on the offline digits data
# (configs/rna/digits_resnet18.json: 600 steps of batch 64, PGD-10 at eps 32 of 255, step 8),
# then evaluated on the 300 held-out digits under the four protocols of rna_eval.py with
# PGD-20, EOT over 10 paths, APGD 100 steps, 10 classification draws; and with eval.py (the
# paper's protocol, as the watcher reports it).
# Run from the repository root: bash docs/experiments/rna_digits.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/rna_digits}
CONFIG=configs/rna/digits_resnet18.json
for norm in rna bn; do
  SET="--set model_dir=$OUT/$norm --set norm_layer=$norm"
  $PY train.py --config $CONFIG $SET
  $PY eval.py --once --config $CONFIG $SET --set num_steps=20
  $PY rna_eval.py --config $CONFIG $SET --set num_steps=20 \
    --repeats 10 --eot_samples 10 --apgd_steps 100 --output "$OUT/rna_eval.jsonl"
done
# The evaluation suite on the RNA model (docs/rna_digits.md, "The evaluation suite on the RNA
# model"): every row that runs on random paths, each read on a fresh path and on the attack's
# own; --resume keeps the rows a stopped run finished.
$PY -m madry_ns.evaluate --config $CONFIG --set model_dir="$OUT/rna" --set num_steps=20 \
  --modes population --attacks fgsm,fgsm16,mim,cw,deepfool,adaptive,eot,autoattack \
  --autoattack rand --apgd_eot_samples 4 --eot_samples 10 --cw_steps 100 --cw_search_steps 2 \
  --deepfool_iters 20 --sanity_step_factor 2 --sanity_restarts 1 --output "$OUT/rna/suite" --resume
mkdir -p docs/rna_suite
cp "$OUT"/rna/suite/{results.md,results.json,per_image.npz} docs/rna_suite/
