"""Evaluation as Madry's eval.py: natural and PGD accuracy on the first test images.

`evaluate` is the pure part (model, data, config in; numbers out). `evaluate_checkpoint`
adds Madry's console lines, TensorBoard summaries in `model_dir/eval` and one JSON line per
checkpoint in `model_dir/eval/metrics.jsonl`; `watch` is Madry's polling loop.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

from madry_ns import attacks, checkpoints, data, files
from madry_ns.progress import Progress, is_terminal

POLL_SECONDS = 10


def make_classifier(model, config, dataset: data.Dataset, bn_mode: str = "population"):
    """`fn(x) -> logits`: the one way test inputs are classified (eval, pgd_attack,
    run_attack), compiled once. `bn_mode` is the inference BN mode."""
    del config, dataset  # used by inference modes that need them (shaped inference)

    @tf.function(reduce_retracing=True)
    def classify(x):
        return model(x, bn_mode=bn_mode)

    return classify


def make_eval_attack(model, config, bn_mode: str = "population"):
    """`attack(x, y, batch_index) -> x_adv`: the config's PGD as eval.py and pgd_attack.py
    run it, compiled once. Batch i's random start is seeded by (np_random_seed, i), so
    pgd_attack.py stores exactly the examples eval.py scores."""
    compiled = attacks.compile_pgd(model, config, bn_mode)

    def attack(x, y, batch_index: int):
        return compiled(x, y, tf.constant([config.np_random_seed, batch_index], tf.int64))

    return attack


def evaluate(model, dataset: data.Dataset, config, bn_mode: str = "population",
             on_batch=None) -> dict:
    """Natural and PGD accuracy and mean cross-entropy on the first `num_eval_examples`
    test images, in batches of `eval_batch_size`; PGD as configured, through `bn_mode`.

    `on_batch(index, num_batches, nat_correct, adv_correct)` is called after each batch.
    The random starts are seeded by (np_random_seed, batch index), so a rerun is identical.
    """
    attack = make_eval_attack(model, config, bn_mode)
    classify = make_classifier(model, config, dataset, bn_mode)

    def score(x, y):
        logits = classify(x)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.int64))
        return correct, tf.reduce_sum(attacks.xent_loss(logits, y))

    n = config.num_eval_examples
    num_batches = -(-n // config.eval_batch_size)
    totals = np.zeros(4)  # nat correct, adv correct, nat xent sum, adv xent sum
    batches = data.eval_batches(dataset.test_images, dataset.test_labels, n,
                                config.eval_batch_size)
    for i, (x, y) in enumerate(batches):
        x_adv = attack(x, y, i)
        nat_correct, nat_xent = score(x, y)
        adv_correct, adv_xent = score(x_adv, y)
        totals += [int(nat_correct), int(adv_correct), float(nat_xent), float(adv_xent)]
        if on_batch:
            on_batch(i, num_batches, int(nat_correct), int(adv_correct))
    return {"natural_accuracy": totals[0] / n, "adversarial_accuracy": totals[1] / n,
            "avg_nat_loss": totals[2] / n, "avg_adv_loss": totals[3] / n, "num_examples": n}


def generate_adversarial(model, dataset: data.Dataset, config, bn_mode: str = "population",
                         on_batch=None) -> np.ndarray:
    """PGD examples for the first `num_eval_examples` test images, as pgd_attack.py stores
    them: float64, (num_eval_examples, 32, 32, 3), 0-255, test order. They are the very
    examples `evaluate` scores (same attack, same seeds, same batches).

    `on_batch(index, num_batches, batch_size)` is called after each batch.
    """
    attack = make_eval_attack(model, config, bn_mode)
    n = config.num_eval_examples
    num_batches = -(-n // config.eval_batch_size)
    out = []
    batches = data.eval_batches(dataset.test_images, dataset.test_labels, n,
                                config.eval_batch_size)
    for i, (x, y) in enumerate(batches):
        out.append(np.asarray(attack(x, y, i), np.float64))
        if on_batch:
            on_batch(i, num_batches, len(x))
    return np.concatenate(out)


def predict(classify, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Predicted labels (int64, Madry's `predictions`) of `classify` on `images` (0-255),
    in batches of `batch_size`."""
    labels = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
        labels.append(tf.argmax(classify(x), axis=1).numpy())
    return np.concatenate(labels).astype(np.int64)


def evaluate_checkpoint(config, path: str, model, dataset: data.Dataset,
                        bn_mode: str = "population", out=print) -> dict:
    """Restore `path` into `model`, evaluate, print Madry's lines, write summaries and a
    metrics line. Returns the metrics."""
    checkpoints.load_weights(model, path)
    step = checkpoints.checkpoint_step(path)
    verbose_batches = not is_terminal(sys.stdout)
    bar = Progress(-(-config.num_eval_examples // config.eval_batch_size), "evaluating")

    def on_batch(i, num_batches, nat_correct, adv_correct):
        if verbose_batches:  # Madry's per-batch lines, kept where output is parsed
            out(config.eval_batch_size)
            out(f"Correctly classified natural examples: {nat_correct}")
            out(f"Correctly classified adversarial examples: {adv_correct}")
        else:
            bar.update()

    start = time.perf_counter()
    result = evaluate(model, dataset, config, bn_mode, on_batch=on_batch)
    bar.close()
    eval_dir = os.path.join(config.model_dir, "eval")
    writer = tf.summary.create_file_writer(eval_dir)
    nat, adv = result["natural_accuracy"], result["adversarial_accuracy"]
    with writer.as_default(step=step):
        # Madry's eval tags keep their spaces, while TF1 rewrote his train tags to
        # underscores, so his shared 'accuracy adv' / 'xent adv' never met the train curves.
        # The underscore names below are the ones train.py writes: they overlay.
        for tag, value in [("xent adv eval", result["avg_adv_loss"]),
                           ("xent adv", result["avg_adv_loss"]),
                           ("xent nat", result["avg_nat_loss"]),
                           ("accuracy adv eval", adv), ("accuracy adv", adv),
                           ("accuracy nat", nat),
                           ("xent_adv", result["avg_adv_loss"]), ("accuracy_adv", adv)]:
            tf.summary.scalar(tag, value)
    writer.close()  # one small event file per evaluation; no handle kept open
    record = {"step": step, "checkpoint": path, **result,
              "attack": {**attacks.config_params(config), "bn_mode": bn_mode},
              "inference_bn": bn_mode, "dataset": dataset.source,
              "seconds": round(time.perf_counter() - start, 3),
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    files.atomic_append_line(os.path.join(eval_dir, "metrics.jsonl"), json.dumps(record))
    out(f"natural: {nat * 100:.2f}%")
    out(f"adversarial: {adv * 100:.2f}%")
    out(f"avg nat loss: {result['avg_nat_loss']:.4f}")
    out(f"avg adv loss: {result['avg_adv_loss']:.4f}")
    return record


def watch(config, model, dataset: data.Dataset, once: bool = False,
          checkpoint: str | None = None, bn_mode: str = "population",
          out=print, sleep=time.sleep) -> list:
    """Madry's eval loop: evaluate each new latest checkpoint in model_dir, forever.

    `once` evaluates the latest (or `checkpoint`) and returns; without a checkpoint it is
    an error rather than a wait.
    """
    os.makedirs(os.path.join(config.model_dir, "eval"), exist_ok=True)
    if checkpoint or once:
        path = checkpoint or checkpoints.latest_checkpoint(config.model_dir)
        if path is None:
            raise checkpoints.CheckpointError(
                f"no checkpoint in model_dir '{config.model_dir}' to evaluate")
        out(f"Checkpoint {path}, evaluating ...   ({datetime.datetime.now()})")
        return [evaluate_checkpoint(config, path, model, dataset, bn_mode, out)]
    last, waiting = None, False
    records = []
    while True:
        path = checkpoints.latest_checkpoint(config.model_dir)
        if path is None:
            if not waiting:
                print("No checkpoint yet, waiting ...", end="", flush=True)
                waiting = True
            else:
                print(".", end="", flush=True)
            sleep(POLL_SECONDS)
        elif path != last:
            if waiting:
                print()
            out(f"Checkpoint {path}, evaluating ...   ({datetime.datetime.now()})")
            sys.stdout.flush()
            records.append(evaluate_checkpoint(config, path, model, dataset, bn_mode, out))
            last, waiting = path, False
        else:
            if not waiting:
                print(f"Waiting for the next checkpoint ...   ({datetime.datetime.now()})   ",
                      end="", flush=True)
                waiting = True
            else:
                print(".", end="", flush=True)
            sleep(POLL_SECONDS)
