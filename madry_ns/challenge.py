"""Madry's challenge scripts as functions: pgd_attack.py (`write_attack_file`) and
run_attack.py (`run_attack`), with his console lines.

Attacks and classification go through `evaluation` (`generate_adversarial`,
`make_classifier`), the same path eval.py uses. Differences from Madry, on purpose: a missing
checkpoint or an invalid attack file is an error with exit status 2 (Madry printed a line
and exited 0); the attack file is named as `np.save` names it on both sides
(`attack_file.npy_path`); run_attack.py reads `num_eval_examples` and `eval_batch_size` from
the config (Madry hard-coded 10000 and 100, the defaults); and the checks refuse NaN, inf,
non-numeric arrays and pickles (see `attack_file`).
"""

from __future__ import annotations

import sys

import numpy as np

from madry_ns import attack_file, checkpoints, data, evaluation, files
from madry_ns.errors import CheckpointError, DataError
from madry_ns.models import build_model
from madry_ns.progress import Progress, is_terminal

PRED_PATH = "pred.npy"  # Madry's run_attack.py: hard-coded, in the working directory


def load_checkpoint_model(config, path: str):
    """The config's model with the weights of checkpoint `path` (ours or Madry's TF1)."""
    model = build_model(config)
    checkpoints.load_weights(model, path)
    return model


def write_attack_file(config, out=print) -> str:
    """`python pgd_attack.py`: PGD examples of the first `num_eval_examples` test images,
    against the latest checkpoint in model_dir, saved atomically to `store_adv_path`
    (float64, (num_eval_examples, H, W, C), 0-255, test order). Returns the file written."""
    checkpoint = checkpoints.latest_checkpoint(config.model_dir)
    if checkpoint is None:
        raise CheckpointError(f"No model found: no checkpoint in model_dir "
                              f"'{config.model_dir}' (its 'checkpoint' state file names none)")
    dataset = data.load_dataset(config)
    model = load_checkpoint_model(config, checkpoint)
    num_batches = -(-config.num_eval_examples // config.eval_batch_size)
    out(f"Iterating over {num_batches} batches")
    verbose_batches = not is_terminal(sys.stdout)
    bar = Progress(num_batches, "attacking")

    def on_batch(i, num_batches, batch_size):
        if verbose_batches:  # Madry's per-batch line, kept where output is parsed
            out(f"batch size: {batch_size}")
        else:
            bar.update()

    if not evaluation.is_madrys_protocol(config):  # Madry's output is unchanged otherwise
        out(f"attack: {evaluation.describe(config)['attack']}")
    x_adv = evaluation.generate_adversarial(model, dataset, config, on_batch)
    bar.close()
    out("Storing examples")
    path = attack_file.npy_path(config.store_adv_path)
    files.atomic_save_npy(path, x_adv)
    out(f"Examples stored in {path}")
    return path


def run_attack(config, out=print, pred_path: str = PRED_PATH) -> dict:
    """`python run_attack.py`: validate `store_adv_path` with Madry's checks, in his order
    and words, then classify it with the latest checkpoint, print `Accuracy: xx.xx%` and
    save the predicted labels (int64) to `pred_path`. Any failed check raises
    (`AttackFileError`, `CheckpointError`) before anything is written."""
    x_adv = attack_file.load(config.store_adv_path)  # loaded first, as Madry's
    checkpoint = checkpoints.latest_checkpoint(config.model_dir)
    if checkpoint is None:
        raise CheckpointError(f"No checkpoint found in model_dir '{config.model_dir}' (its "
                              f"'checkpoint' state file names none)")
    attack_file.check_array(x_adv, config.num_eval_examples, data.image_shape(config))
    dataset = data.load_dataset(config)
    n = config.num_eval_examples
    if n > len(dataset.test_images):
        raise DataError(f"num_eval_examples {n} exceeds the {len(dataset.test_images)} "
                        f"test images of {dataset.source}")
    l_inf = attack_file.check_perturbation(x_adv, dataset.test_images[:n], config.epsilon)
    model = load_checkpoint_model(config, checkpoint)
    classify = evaluation.make_classifier(model, config, dataset)
    if not evaluation.is_madrys_protocol(config):
        out(f"inference: {evaluation.describe(config)['inference']}")
    pred = evaluation.predict(classify, x_adv, config.eval_batch_size)
    accuracy = float(np.mean(pred == dataset.test_labels[:n]))
    out(f"Accuracy: {100.0 * accuracy:.2f}%")
    files.atomic_save_npy(pred_path, pred)
    out(f"Output saved at {pred_path}")
    return {"accuracy": accuracy, "checkpoint": checkpoint, "max_perturbation": l_inf,
            "num_examples": n, "pred_path": pred_path}
