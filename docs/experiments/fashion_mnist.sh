#!/usr/bin/env bash
# The three studies on Fashion-MNIST (issue 19): the norm-shaping paper's Tables I and IV, the
# fragile-features paper's Table 2 and RNA's four protocols, on the configs in
# configs/fashion_mnist and configs/fragile/fashion_mnist (ResNet-20 width 1, 900 steps of batch
# 64, eps 25.5 of 255, training PGD-7 step 6.375; see their "_setting").
#
# Needs the IDX files: `apt-get install dataset-fashion-mnist` (read from
# /usr/share/datasets/fashion-mnist), or Keras' cache ~/.keras/datasets/fashion-mnist, or
# data_path (configs: fashion_mnist_data).
#
# The work is long (about 25 minutes per adversarial training on 2 CPU cores, 24 trainings), so
# the script is made to be run in parts and again:
#   bash docs/experiments/fashion_mnist.sh [train [NAME...]|table1 [NAME...]|table4|fragile|rna|all]
# * train.py resumes a stopped training from its latest checkpoint and leaves a finished one
#   alone; the suite runs with --resume (it continues after its last finished batch, so it
#   runs first, before the 10,000-image eval.py, which is one unit); the Table IV grid keeps every
#   (checkpoint, ratio) cell it finished; the fragile study runs row by row, and each finished
#   row (its checkpoint and evaluation) is kept in docs/fashion_mnist/fragile/models/KEY;
#   rna_eval.py continues after its last finished test batch.
# * Nothing a later session needs is left only in $MODELS, which a new machine does not have:
#   each finished training's final checkpoint (2.2 MB: weights, BN statistics, momentum, step)
#   and its console log are kept in docs/fashion_mnist/models/NAME and put back into $MODELS
#   when missing there, so train.py finds the training finished and the suites resume on the
#   very weights they started with (--resume checks the clean predictions image by image).
#   The suites, the Table IV grid and rna_eval.py write straight into docs/fashion_mnist/
#   (small files, each written atomically after every batch or cell), so a stopped part is
#   in git as far as it got.
# Run from the repository root. PYTHON defaults to .venv/bin/python, MODELS to
# models/fashion_mnist, DOCS (where results and kept models go) to docs/fashion_mnist.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1  # progress lines reach the tee'd logs as they are printed
MODELS=${MODELS:-models/fashion_mnist}
DOCS=${DOCS:-docs/fashion_mnist}
C=configs/fashion_mnist
PART=${1:-all}
# Clean accuracy on all 10,000 test images; attacks on the first 1,000.
ATTACKED=1000
# Every evaluation attack is PGD-20 with step 2.55 (eps/10), not the training's PGD-7: on the
# Madry model, 100 test images lost 4-5 more points to PGD-35 from 4 random starts than to
# PGD-7, so PGD-7 is too weak a reading here. The fragile and RNA parts use the same attack.
PGD20=(--set num_steps=20 --set step_size=2.55)

KEPT=$DOCS/models
keep() {  # keep DIR KEPT [FILE...]: DIR's latest checkpoint, its config and FILEs, into KEPT
  local dir=$1 kept=$2 latest; shift 2
  latest=$(sed -n 's/^model_checkpoint_path: "\(.*\)"$/\1/p' "$dir/checkpoint")
  rm -rf "$kept.tmp" && mkdir -p "$kept.tmp"
  cp "$dir/$latest".* "$dir/config.json" "$@" "$kept.tmp"/
  printf 'model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' \
    "$latest" "$latest" > "$kept.tmp/checkpoint"
  rm -rf "$kept" && mv "$kept.tmp" "$kept"
}

putback() {  # putback KEPT DIR: a kept model back where the tools look for it, if missing there
  if [ -f "$1/checkpoint" ] && [ ! -f "$2/checkpoint" ]; then
    mkdir -p "$2" && cp "$1"/* "$2"/
  fi
}

finished() {  # finished NAME...: each training's model in $MODELS, put back from docs/ if need be
  local name
  for name in "$@"; do
    if [ ! -f "$KEPT/$name/checkpoint" ]; then
      echo "fashion_mnist.sh: $name has not finished training (no $KEPT/$name); run 'train' first" >&2
      return 1
    fi
    putback "$KEPT/$name" "$MODELS/$name"
  done
}

train() {  # train CONFIG NAME [--set ...]: resumes, or does nothing once finished
  local config=$1 name=$2; shift 2
  local dir=$MODELS/$name
  putback "$KEPT/$name" "$dir"
  mkdir -p "$dir"
  $PY train.py --config "$config" --set model_dir="$dir" "$@" 2>&1 | tee -a "$dir/train.log"
  # train.py returned, so the training is finished (a stopped one exits non-zero)
  [ -f "$KEPT/$name/checkpoint" ] || keep "$dir" "$KEPT/$name" "$dir/train.log"
}

copy() {  # copy DEST FILE...: small result files into docs/
  local dest=$DOCS/$1; shift
  mkdir -p "$dest"
  cp "$@" "$dest"/
}

# Table I's four models, and shaping at the training ratios 1:1 and 1:7 for Table IV. The PGD
# family first: with it, Table I's PGD rows and the whole Table IV can run before TRADES is done.
TABLE1=(madry_pgd shaping_pgd trades shaping_trades)
TRAININGS=(madry_pgd shaping_pgd shaping_pgd_r1 shaping_pgd_r7 trades shaping_trades)
if [[ $PART == train || $PART == all ]]; then
  # `train NAME...` trains only those: two such lanes, each with its own models, use the two
  # cores better than one (ResNet-20's small convolutions leave one process short of both).
  NAMES=("${@:2}")
  for name in "${NAMES[@]:-${TRAININGS[@]}}"; do
    train "$C/$name.json" "$name"
  done
fi

# Table I: each model's clean accuracy on 10,000 images (eval.py, its own inference mode) and
# the suite on the first 1,000 under BN, PN and BN+Shaping 1:9: PGD generated on PN (the paper's
# protocol), the shaping attack, the adaptive PGD through each column's own forward, and EOT
# over the shaped forward's reference draws.
if [[ $PART == table1 || $PART == all ]]; then
  # `table1 NAME...` evaluates only those models (e.g. the PGD pair while TRADES trains).
  NAMES=("${@:2}")
  for name in "${NAMES[@]:-${TABLE1[@]}}"; do
    finished "$name"
    dir=$MODELS/$name
    out=$DOCS/table1/$name
    mkdir -p "$out"
    # Sanity at 2x the steps from 2 random starts (the suite's default 5x from 4 would cost
    # about 4 hours per model through the 1:9 shaped forward on this CPU).
    $PY -m madry_ns.evaluate --config "$C/$name.json" --set model_dir="$dir" "${PGD20[@]}" \
      --set num_eval_examples=$ATTACKED --num_examples $ATTACKED \
      --attacks fgsm,pgd,shaping,adaptive,eot --eot_samples 5 \
      --sanity_step_factor 2 --sanity_restarts 2 --output "$out/suite" --resume \
      2>&1 | tee -a "$out/suite_console.txt"
    if [ ! -f "$out/clean_10000.txt" ]; then
      $PY eval.py --once --config "$C/$name.json" --set model_dir="$dir" "${PGD20[@]}" \
        --set num_eval_examples=10000 | tee "$out/clean_10000.txt.tmp"
      mv "$out/clean_10000.txt.tmp" "$out/clean_10000.txt"
    fi
  done
fi

# Table IV: the training ratios 1:0 (Madry), 1:1, 1:3 and 1:7 against the inference ratios
# 1:0 ... 1:49, PGD generated on PN beside the exact adaptive PGD; clean on 10,000 images.
if [[ $PART == table4 || $PART == all ]]; then
  finished madry_pgd shaping_pgd_r1 shaping_pgd shaping_pgd_r7
  $PY -m madry_ns.studies.shaping --config "$C/shaping_pgd.json" "${PGD20[@]}" \
    --set num_eval_examples=10000 \
    --attack_examples $ATTACKED \
    --checkpoints "$MODELS/madry_pgd" "$MODELS/shaping_pgd_r1" "$MODELS/shaping_pgd" \
    "$MODELS/shaping_pgd_r7" --labels "1:0" "1:1" "1:3" "1:7" --output "$DOCS/table4"
fi

# Table 2 of the fragile-features paper (its 12 regimes, both readings of BN ONLY PARAMS), and
# the folded-BN analysis (m/b) of NORMAL, ADV and BN PARAMS.
if [[ $PART == fragile || $PART == all ]]; then
  F=configs/fragile/fashion_mnist
  # AutoAttack's standard version on survivors, as the paper ran it: exact for these models
  # (population statistics, a per-image forward), and no attack runs on an image already broken.
  FARGS=(--num_robust_examples $ATTACKED --autoattack standard --pgd_steps 20
         --pgd_step_size 2.55)
  # One row at a time, so each finished row (its final checkpoint and its evaluation,
  # fragile_eval.json) is kept in docs/ at once; NORMAL first, the fine-tuned rows start from it.
  # The models live where the configs put them (model_dir models/fragile_fashion_mnist/KEY).
  for key in normal normal_bn_only normal_bn_only_logits_conv1 adv adv_bn_only \
      adv_bn_only_logits_conv1 bn_stats bn_stats_reset bn_only_params bn_only_params_batch \
      bn_params bn_params_logits_conv1; do
    dir=models/fragile_fashion_mnist/$key kept=$DOCS/fragile/models/$key
    putback "$kept" "$dir"
    if [ ! -f "$kept/fragile_eval.json" ]; then
      mkdir -p "$dir"
      $PY -m madry_ns.studies.fragile "$F" --rows "$key" --no_analysis \
        --output "$MODELS/fragile_rows/$key" "${FARGS[@]}" 2>&1 | tee -a "$dir/train.log"
      keep "$dir" "$kept" "$dir/fragile_eval.json" "$dir/train.log"
    fi
  done
  # Every row is cached now: the table of all twelve, and the analysis of NORMAL, ADV, BN PARAMS.
  $PY -m madry_ns.studies.fragile "$F" --output "$MODELS/fragile" "${FARGS[@]}"
  copy fragile "$MODELS"/fragile/table.{md,json}
  copy fragile/bn_analysis "$MODELS"/fragile/bn_analysis/{summary.json,bn_layers.csv,mean_m_per_layer.png}
fi

# RNA against the same network with plain BN, under the four protocols, R = 10 fresh paths.
if [[ $PART == rna || $PART == all ]]; then
  for norm in rna bn; do
    SET=(--set model_dir="$MODELS/rna_$norm" --set norm_layer=$norm)
    train "$C/rna_resnet20.json" "rna_$norm" --set norm_layer=$norm
    # rna_eval.py saves its finished test batches beside its output after each one
    # (rna_eval.jsonl.partial.npz) and appends one line when done: with --resume a stopped
    # run continues after its last batch and a finished one is not run again.
    mkdir -p "$DOCS/rna/$norm"
    $PY rna_eval.py --config "$C/rna_resnet20.json" "${SET[@]}" \
      --set num_eval_examples=$ATTACKED --set num_steps=20 --set step_size=2.55 \
      --repeats 10 --eot_samples 10 --apgd_steps 100 --resume \
      --output "$DOCS/rna/$norm/rna_eval.jsonl" 2>&1 | tee -a "$DOCS/rna/$norm/console.txt"
  done
fi
