"""Best-checkpoint selection during training (`select_best`).

At every checkpoint train.py writes (every `num_checkpoint_steps`, and the final one), the
model is evaluated exactly as eval.py evaluates it (`evaluation.evaluate`: the config's
classifier and inference mode, RNA's random paths, seeded), with PGD of `select_num_steps`
steps on `select_examples` images; the checkpoint with the best robust accuracy is kept as
`model_dir/best/checkpoint-<step>` (the format of every checkpoint: eval.py `--checkpoint`,
`checkpoints.latest_checkpoint`, `load_model` read it), and every measurement goes into
`model_dir/best/selection.json`.

Two variants:

* `heldout`: `select_examples` training images, a fixed subset drawn from the seed stream
  `select_heldout` (`seeds.heldout`), are removed from the training set before anything
  trains on them and are the selection set. The training set is that much smaller.
* `test`: the released RNA code's choice (UniSerj/Random-Norm-Aggregation `train.py` keeps
  the epoch with the best PGD-20 *test* accuracy): the first `select_examples` test images.
  A number measured afterwards on those images is optimistic, so every label, console line,
  TensorBoard tag and file says it selected on TEST data.

Deviations from the released code: the selection runs at every checkpoint (one per epoch
in `configs/rna/`), also at step 0 (the initial or `init_checkpoint` model) and on
`select_examples` images rather than the whole test set; the released code ran its PGD-20
evaluation three times per epoch ("3 rounds") and kept the mean, this runs it once, seeded.
Ties keep the earlier step, as the released strict `>` does.

Crash safety: the new best's files are written first, then `selection.json` (atomically: the
commit point), then the `checkpoint` state file, then the previous best's files are deleted.
A kill at any point leaves the previous best complete; on resume, `selection.json` decides,
stray files are removed and a checkpoint whose measurement is missing (always the latest one,
which the model then holds) is measured; measured steps are never redone.

Supported on one device and under `distribution: mirrored` (the selection evaluates outside
the replicas, on the averaged statistics the checkpoint holds); refused under `multi_worker`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import time

import numpy as np

from madry_ns import data, files, seeds
from madry_ns.errors import ConfigError

BEST_DIR = "best"
SELECTION_FILE = "selection.json"
HELDOUT_STREAM = "select_heldout"
# The keys a resumed run must share with the run that started model_dir.
KEYS = ("select_best", "select_examples", "select_num_steps")


def label(config) -> str:
    """'heldout' or 'TEST' (capitals: a selection on test data must be seen as one)."""
    return "TEST" if config.select_best == "test" else "heldout"


def describe_set(config) -> str:
    """What the selection measures on, in words, for the console and selection.json."""
    n = config.select_examples
    if config.select_best == "test":
        return (f"the first {n} TEST images (selected on TEST data: a test number of the "
                f"selected checkpoint is optimistic)")
    return (f"{n} training images held out of training (seed stream '{HELDOUT_STREAM}'; "
            f"the model trains on the rest)")


def heldout_indices(config, num_train: int) -> np.ndarray:
    """The sorted indices of the held-out training images: the first `select_examples` of a
    stateless shuffle of range(num_train) under `seeds.heldout(config)`."""
    import tensorflow as tf

    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_train, dtype=tf.int64), seed=seeds.heldout(config))
    return np.sort(order[:config.select_examples].numpy())


def check_sizes(config, dataset: data.Dataset) -> None:
    """ConfigError naming `select_examples` when the dataset cannot give that many images."""
    n = config.select_examples
    if config.select_best == "heldout":
        left = len(dataset.train_images) - n
        if left < config.training_batch_size:
            raise ConfigError(
                f"select_examples {n} with select_best 'heldout' leaves {max(left, 0)} of the "
                f"{len(dataset.train_images)} training images of {dataset.source} for "
                f"training, fewer than training_batch_size {config.training_batch_size}; "
                f"hold out fewer images")
    elif config.select_best == "test" and n > len(dataset.test_images):
        raise ConfigError(f"select_examples {n} with select_best 'test' exceeds the "
                          f"{len(dataset.test_images)} test images of {dataset.source}")


def split(config, dataset: data.Dataset) -> tuple[data.Dataset, data.Dataset | None,
                                                  np.ndarray | None]:
    """(the dataset training uses, the dataset the selection evaluates, held-out indices).

    `none`: (dataset, None, None), untouched. `heldout`: training gets the training images
    minus the held-out ones (order kept); the selection's test split is the held-out images
    and its training split the rest (shaped inference's references come from it).
    `test`: the dataset as loaded for both.
    """
    if config.select_best == "none":
        return dataset, None, None
    check_sizes(config, dataset)
    if config.select_best == "test":
        return dataset, dataset, None
    held = heldout_indices(config, len(dataset.train_images))
    keep = np.setdiff1d(np.arange(len(dataset.train_images)), held)
    train = dataclasses.replace(dataset, train_images=dataset.train_images[keep],
                                train_labels=dataset.train_labels[keep])
    selection = dataclasses.replace(
        dataset, train_images=dataset.train_images[keep],
        train_labels=dataset.train_labels[keep], test_images=dataset.train_images[held],
        test_labels=dataset.train_labels[held],
        source=f"{dataset.source}: {len(held)} held-out training images")
    return train, selection, held


def check_resume(config) -> None:
    """ConfigError when model_dir's `config.json` (the run being resumed) had other selection
    keys: a change would alter the training set or mix incomparable measurements."""
    path = os.path.join(config.model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    from madry_ns.config import default_value

    for key in KEYS:
        before = saved.get(key, default_value(key))
        if before != getattr(config, key):
            raise ConfigError(
                f"key '{key}' is {json.dumps(getattr(config, key))}, but the run in "
                f"'{config.model_dir}' being resumed used {json.dumps(before)} ({path}); "
                f"keep it, or train into a new model_dir")


def is_selection_step(config, step: int) -> bool:
    """Whether the checkpoint of `step` is measured: the periodic ones and the final one."""
    return step % config.num_checkpoint_steps == 0 or step == config.max_num_training_steps


def _digest(indices) -> str:
    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()


class Selector:
    """Measures checkpoints and keeps the best in `model_dir/best` (see the module docstring).

    `measure(step)` evaluates the model as it is (the weights of `checkpoint-<step>`), records
    the measurement and, if it is the best so far, writes `best/checkpoint-<step>`; `pending`
    says whether a step still needs measuring. `evaluate` (tests replace it) takes the model
    and returns `evaluation.evaluate`'s dict.
    """

    def __init__(self, config, model, optimizer, selection_data: data.Dataset,
                 heldout: np.ndarray | None, out=print, evaluate=None):
        import tensorflow as tf

        from madry_ns import attacks, evaluation

        self.config, self.model, self.out = config, model, out
        self.data = selection_data
        self.eval_config = config.replace(num_eval_examples=config.select_examples,
                                          num_steps=config.select_num_steps)
        self._evaluate = evaluate or (
            lambda m: evaluation.evaluate(m, self.data, self.eval_config))
        self.dir = os.path.join(config.model_dir, BEST_DIR)
        self.path = os.path.join(self.dir, SELECTION_FILE)
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.checkpoint.save_counter  # created now, so it is saved as in every checkpoint
        how = evaluation.describe(self.eval_config)
        self.settings = {
            "select_best": config.select_best, "label": label(config),
            "selected_on": describe_set(config), "num_examples": config.select_examples,
            "heldout": None if heldout is None else {
                "seed_stream": HELDOUT_STREAM, "np_random_seed": config.np_random_seed,
                "indices_sha256": _digest(heldout), "indices": [int(i) for i in heldout]},
            "attack": how["attack"], "inference": how["inference"],
            "attack_settings": {**attacks.config_params(self.eval_config),
                                "eval_attack_bn": config.eval_attack_bn},
            "inference_bn": config.inference_bn, "eval_batch_size": config.eval_batch_size,
            "inference_seed": config.inference_seed, "dataset": selection_data.source,
            "ties": "the earlier step is kept"}
        self.record = self._load()
        self._writer = None

    # ---- the record ----

    def _load(self) -> dict:
        if not os.path.exists(self.path):
            return {**self.settings, "measurements": [], "best_step": None,
                    "best_checkpoint": None, "best_adversarial_accuracy": None}
        try:
            with open(self.path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path} cannot be read ({e}); move it away to start the "
                              f"selection over") from None
        for key, value in self.settings.items():
            # The data's description names its folder, which may move between runs.
            if key != "dataset" and record.get(key) != value:
                raise ConfigError(
                    f"{self.path} was made with {key} {json.dumps(record.get(key))[:200]}, "
                    f"this run's is {json.dumps(value)[:200]}: its measurements would not "
                    f"compare; keep the settings or train into a new model_dir")
        self._reconcile(record)
        return record

    def _prefix(self, step: int) -> str:
        return os.path.join(self.dir, f"checkpoint-{step}")

    def _reconcile(self, record: dict) -> None:
        """Make best/ agree with selection.json after a kill: its best is the latest, other
        checkpoint files are removed."""
        import tensorflow as tf

        step = record.get("best_step")
        if step is None:
            self._remove_others(None)
            return
        prefix = self._prefix(step)
        if not os.path.exists(prefix + ".index"):
            raise ConfigError(f"{self.path} names best step {step}, but {prefix}.index is "
                              f"missing; move {self.dir} away to start the selection over")
        if tf.train.latest_checkpoint(self.dir) != prefix:
            self._point_state(prefix)
        self._remove_others(step)

    def _point_state(self, prefix: str) -> None:
        # TensorFlow's `checkpoint` state file (a CheckpointState in text format), written
        # atomically; the name is relative, so best/ still loads after being moved.
        name = json.dumps(os.path.basename(prefix))
        files.atomic_write_text(os.path.join(self.dir, "checkpoint"),
                                f"model_checkpoint_path: {name}\n"
                                f"all_model_checkpoint_paths: {name}\n")

    def _remove_others(self, keep: int | None) -> None:
        for path in glob.glob(os.path.join(self.dir, "checkpoint-*")):
            match = re.fullmatch(r"checkpoint-(\d+)\..+", os.path.basename(path))
            if match and int(match.group(1)) != keep:
                os.unlink(path)

    def measured_steps(self) -> list[int]:
        return [m["step"] for m in self.record["measurements"]]

    def pending(self, step: int) -> bool:
        """Whether `step`'s checkpoint is to be measured and has not been."""
        return is_selection_step(self.config, step) and step not in self.measured_steps()

    # ---- measuring ----

    def measure(self, step: int) -> dict:
        """Evaluate the model (holding `checkpoint-<step>`'s weights), record it, keep it
        under best/ if it beats every earlier step (a tie keeps the earlier); the
        measurement. An RNA model's active path is put back afterwards, so the selection
        changes nothing in training."""
        import tensorflow as tf

        from madry_ns import rna

        path = tf.identity(self.model.path()) if rna.has_rna(self.model) else None
        start = time.perf_counter()
        result = self._evaluate(self.model)
        if path is not None:
            self.model.set_path(path)
        measurement = {"step": int(step), "checkpoint": f"checkpoint-{step}",
                       "adversarial_accuracy": float(result["adversarial_accuracy"]),
                       "natural_accuracy": float(result["natural_accuracy"]),
                       "avg_adv_loss": float(result["avg_adv_loss"]),
                       "avg_nat_loss": float(result["avg_nat_loss"]),
                       "seconds": round(time.perf_counter() - start, 3)}
        best = self.record["best_adversarial_accuracy"]
        better = best is None or measurement["adversarial_accuracy"] > best
        record = {**self.record, "measurements": self.record["measurements"] + [measurement]}
        if better:
            prefix = self._prefix(step)
            self._write_config()
            self.checkpoint.write(prefix)
            record.update(best_step=int(step), best_checkpoint=os.path.join(BEST_DIR,
                                                                            f"checkpoint-{step}"),
                          best_adversarial_accuracy=measurement["adversarial_accuracy"],
                          best_natural_accuracy=measurement["natural_accuracy"])
        files.atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
        self.record = record
        if better:
            self._point_state(self._prefix(step))
            self._remove_others(step)
        self._report(measurement)
        return measurement

    def _write_config(self) -> None:
        # load_model and eval.py's input-normalization check read the config beside a
        # checkpoint.
        files.atomic_write_text(os.path.join(self.dir, "config.json"), self.config.to_json())

    def _report(self, m: dict) -> None:
        import tensorflow as tf

        r, tag = self.record, label(self.config)
        self.out(f"Selection on {tag} images at step {m['step']}: adversarial "
                 f"{m['adversarial_accuracy'] * 100:.2f}%, natural "
                 f"{m['natural_accuracy'] * 100:.2f}%; best step {r['best_step']} "
                 f"({r['best_adversarial_accuracy'] * 100:.2f}%)"
                 + (" [selected on TEST data: optimistic]" if tag == "TEST" else ""))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.dir)
        with self._writer.as_default(step=m["step"]):
            tf.summary.scalar(f"selection/adversarial_accuracy_{tag}", m["adversarial_accuracy"])
            tf.summary.scalar(f"selection/natural_accuracy_{tag}", m["natural_accuracy"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
