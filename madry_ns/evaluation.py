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

from madry_ns import attacks, checkpoints, data, files, inference, rna, seeds, shaping
from madry_ns.graph import function_for
from madry_ns.progress import Progress, is_terminal

POLL_SECONDS = 10


class Classifier:
    """`classifier(x) -> logits`: the one way test inputs are classified (eval, pgd_attack,
    run_attack), per `inference_bn` (a mode of `madry_ns.inference`), compiled once per
    input shape.

    The n-th call seeds the mode's draws with (inference_seed, n), so a rerun is identical:
    shaped inference with 'fresh' references draws new ones on every call ('fixed' ones never
    change); a model with RNA layers classifies on a fresh random path per call (the
    released evaluation: one path per test batch) or on the one fixed path.
    """

    def __init__(self, model, config, dataset: data.Dataset):
        self.config = config
        self.calls = 0
        self.forward = inference.forward(model, config, dataset)
        self._forward = function_for(model)(self.forward.classify)

    def __call__(self, x):
        seed = seeds.pair(self.config.inference_seed, self.calls)
        self.calls += 1
        return self._forward(tf.convert_to_tensor(x, tf.float32), seed)


def is_madrys_protocol(config) -> bool:
    """Whether evaluation is Madry's (population BN, deterministic), whose output stays
    unlabelled, as his; any other inference prints how its numbers were made."""
    return config.inference_bn == "population" and config.norm_layer == "bn"


def make_shaped_inference(model, config, dataset: data.Dataset) -> shaping.ShapedInference:
    """The config's BN+Shaping inference (`inference.make_shaped_inference`)."""
    return inference.make_shaped_inference(model, config, dataset)


def make_classifier(model, config, dataset: data.Dataset) -> Classifier:
    """See `Classifier`."""
    return Classifier(model, config, dataset)


def make_eval_attack(model, config, classifier: Classifier):
    """`attack(x, y, batch_index) -> x_adv`: the config's PGD, compiled once per shape.

    It differentiates through the classifier's own forward (`eval_attack_bn: inference`, an
    adaptive attack: `inference.Forward.attack`, so for fresh shaped references or fresh RNA
    paths the attacker uses its own draw, for fixed ones the very references or path that
    classify) or through population statistics ('population', the norm-shaping paper's
    protocol, a transfer when inference is not population). A model with RNA layers is
    always attacked through its random-path forward.
    """
    params = attacks.config_params(config)
    loss = attacks.LOSSES[params.pop("loss_func")]
    through_population = not rna.has_rna(model) and (
        config.eval_attack_bn == "population" or config.inference_bn == "population")
    forward = inference.forward(model, config, None, "population") if through_population \
        else classifier.forward

    @function_for(model)
    def attack(x, y, batch_index):
        draw = seeds.reference_draw(config, batch_index)
        return attacks.pgd(lambda z: tf.reduce_sum(loss(forward.attack(z, draw), y)), x,
                           seed=seeds.eval_start(config, batch_index), **params)

    return lambda x, y, i: attack(tf.convert_to_tensor(x, tf.float32), y,
                                  tf.constant(i, tf.int64))


def describe(config) -> dict:
    """Labels saying how the numbers were made: inference mode and attack generation, in
    full (`inference`, `attack`) and short, for tables (`inference_short`, `attack_short`)."""
    mode = inference.get(config.inference_bn)
    pgd = (f"PGD-{config.num_steps} ({config.loss_func}, eps {config.epsilon:g}, step "
           f"{config.step_size:g}{', random start' if config.random_start else ''})")
    if config.norm_layer == "rna":
        return describe_rna(config, pgd)
    if config.inference_bn != "population" and config.eval_attack_bn == "population":
        how = "generated on PN (transfer, the paper's protocol)"
    else:
        how = mode.adaptive(config)
    return {"inference": mode.label(config), "attack": f"{pgd} {how}",
            "inference_short": mode.tag(config), "attack_short": how}


def rna_space(config) -> str:
    """'RNA over bn/in, per-layer paths' and the BN candidate's statistics."""
    stats = "population" if config.inference_bn == "population" else "test-batch"
    return (f"RNA over {'/'.join(config.rna_candidates)}, {config.rna_sampling.replace('_', '-')} "
            f"paths, BN candidate with {stats} statistics")


def describe_rna(config, attack: str) -> dict:
    """`describe` for a model with RNA layers: which paths classify and which are attacked."""
    space = rna_space(config)
    if config.rna_inference_path == "fixed":
        return {"inference": f"{space}: one fixed path (seed {config.inference_seed})",
                "attack": f"{attack} on the fixed path that classifies (white-box on one path)"}
    return {"inference": f"{space}: a fresh random path for every classified batch",
            "attack": (f"{attack} on the attacker's own random path, classified on another "
                       f"(the paper's protocol, a transfer between paths; fixed-path, EOT and "
                       f"AutoAttack-EOT numbers: python rna_eval.py)")}


def evaluate(model, dataset: data.Dataset, config, on_batch=None) -> dict:
    """Natural and PGD accuracy and mean cross-entropy on the first `num_eval_examples`
    test images, in batches of `eval_batch_size`, classified per `inference_bn` and attacked
    per `eval_attack_bn` (see `describe`).

    `on_batch(index, num_batches, nat_correct, adv_correct)` is called after each batch.
    Random starts and reference draws are seeded, so a rerun is identical.
    """
    classify = make_classifier(model, config, dataset)
    attack = make_eval_attack(model, config, classify)

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
            "avg_nat_loss": totals[2] / n, "avg_adv_loss": totals[3] / n, "num_examples": n,
            **describe(config)}


def generate_adversarial(model, dataset: data.Dataset, config, on_batch=None) -> np.ndarray:
    """PGD examples for the first `num_eval_examples` test images, as pgd_attack.py stores
    them: float64, (num_eval_examples, 32, 32, 3), 0-255, test order. They are the very
    examples `evaluate` scores (same attack, same seeds, same batches).

    `on_batch(index, num_batches, batch_size)` is called after each batch.
    """
    attack = make_eval_attack(model, config, make_classifier(model, config, dataset))
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


def evaluate_checkpoint(config, path: str, model, dataset: data.Dataset, out=print) -> dict:
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
    result = evaluate(model, dataset, config, on_batch=on_batch)
    bar.close()
    eval_dir = os.path.join(config.model_dir, "eval")
    writer = tf.summary.create_file_writer(eval_dir)
    nat, adv = result["natural_accuracy"], result["adversarial_accuracy"]
    with writer.as_default(step=step):
        # Madry's eval tags keep their spaces; the underscore ones are the names train.py
        # writes, so train and eval curves overlay in TensorBoard (Madry's did not).
        for tag, value in [("xent adv eval", result["avg_adv_loss"]),
                           ("xent adv", result["avg_adv_loss"]),
                           ("xent nat", result["avg_nat_loss"]),
                           ("accuracy adv eval", adv), ("accuracy adv", adv),
                           ("accuracy nat", nat),
                           ("xent_adv", result["avg_adv_loss"]), ("accuracy_adv", adv)]:
            tf.summary.scalar(tag, value)
    writer.close()  # one small event file per evaluation; no handle kept open
    record = {"step": step, "checkpoint": path, **result,
              "attack_settings": {**attacks.config_params(config),
                                  "eval_attack_bn": config.eval_attack_bn},
              "inference_bn": config.inference_bn, "dataset": dataset.source,
              "seconds": round(time.perf_counter() - start, 3),
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    files.atomic_append_line(os.path.join(eval_dir, "metrics.jsonl"), json.dumps(record))
    if not is_madrys_protocol(config):  # Madry's output is unchanged otherwise
        out(f"inference: {result['inference']}")
        out(f"attack: {result['attack']}")
    out(f"natural: {nat * 100:.2f}%")
    out(f"adversarial: {adv * 100:.2f}%")
    out(f"avg nat loss: {result['avg_nat_loss']:.4f}")
    out(f"avg adv loss: {result['avg_adv_loss']:.4f}")
    return record


def watch(config, model, dataset: data.Dataset, once: bool = False,
          checkpoint: str | None = None, out=print, sleep=time.sleep) -> list:
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
        return [evaluate_checkpoint(config, path, model, dataset, out)]
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
            records.append(evaluate_checkpoint(config, path, model, dataset, out))
            last, waiting = path, False
        else:
            if not waiting:
                print(f"Waiting for the next checkpoint ...   ({datetime.datetime.now()})   ",
                      end="", flush=True)
                waiting = True
            else:
                print(".", end="", flush=True)
            sleep(POLL_SECONDS)
