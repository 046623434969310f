"""Madry's adversarial training loop (cifar10_challenge `train.py`) in TF2, resumable.

Per step: attack the batch with PGD (in the BN mode `train_attack_bn_mode`; Madry's train-mode
model made every attack step update the moving averages, which `batch_update` keeps), then
one TF1-momentum update on the adversarial batch with mean cross-entropy plus
`weight_decay * sum(||W||^2 / 2)` over conv and dense kernels. Attack and update are one
compiled function. Console lines, TensorBoard tags and checkpoint names are Madry's.

Where this differs from Madry, on purpose:
* `checkpoint-N` is the state after N updates, written before step N's attack (Madry wrote it
  after the attack, whose BN updates it then contained), so resuming from it repeats step N
  exactly; and a final `checkpoint-<max_num_training_steps>` is written.
* Running train.py again resumes from the latest checkpoint (Madry always started over).
* The clean-accuracy forward of the console report uses batch statistics without updating
  the moving averages (Madry's also nudged them every `num_output_steps`), so logging never
  changes training.
"""

from __future__ import annotations

import datetime
import os
import time

import keras
import tensorflow as tf

from madry_ns import attacks, checkpoints, data, files
from madry_ns.models import build_model


class TF1Momentum(keras.optimizers.Optimizer):
    """`tf.train.MomentumOptimizer` (non-Nesterov): accum = m * accum + g; w -= lr * accum.

    Keras' SGD keeps v = m * v - lr * g instead; the two agree at a constant learning rate and
    differ for a while after each drop, so Madry's schedule needs this one.
    """

    def __init__(self, learning_rate, momentum: float = 0.9, name: str = "TF1Momentum",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.accumulators = self.add_optimizer_variables(variables, "Momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        accum = self.accumulators[self._get_variable_index(variable)]
        self.assign(accum, accum * tf.cast(self.momentum, variable.dtype)
                    + tf.cast(gradient, variable.dtype))
        self.assign_sub(variable, lr * accum)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


def learning_rate_schedule(step_size_schedule):
    """Madry's piecewise-constant rate: the first pair's step is dropped, and step s (before
    its update) gets the value of the first boundary >= s, as TF1 `piecewise_constant`."""
    boundaries = [int(s) for s, _ in step_size_schedule[1:]]
    values = [float(v) for _, v in step_size_schedule]
    if not boundaries:
        return values[0]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(config) -> TF1Momentum:
    return TF1Momentum(learning_rate_schedule(config.step_size_schedule), config.momentum)


def weight_decay_loss(model):
    """Madry's `_decay`: sum of tf.nn.l2_loss (sum(w^2)/2) over conv and dense kernels."""
    return tf.add_n([tf.nn.l2_loss(v) for v in model.decay_variables()])


def make_train_step(model, optimizer, config):
    """One compiled function `step(x, y, step) -> metrics`: attack, then update."""
    params = attacks.config_params(config)
    global_batch = config.training_batch_size
    train_vars = model.trainable_variables

    def adversarial(x, y, step):
        if config.training_method == "natural":
            return x
        seed = tf.stack([tf.constant(config.np_random_seed, tf.int64), step])
        return attacks.pgd_attack(model, x, y, bn_mode=config.train_attack_bn_mode, seed=seed,
                                  **params)

    @tf.function
    def train_step(x, y, step):
        x_adv = adversarial(x, y, step)
        with tf.GradientTape() as tape:
            logits = model(x_adv, bn_mode="batch_update")
            per_example = attacks.xent_loss(logits, y)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            decay = config.weight_decay * weight_decay_loss(model)
            total = loss + tf.nn.scale_regularization_loss(decay)
        grads = tape.gradient(total, train_vars)
        # Read before the update increments `iterations`: the rate this step uses.
        learning_rate = tf.identity(optimizer.learning_rate)
        optimizer.apply_gradients(zip(grads, train_vars))
        correct = tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32)
        return {"adv_accuracy": tf.reduce_mean(correct), "xent": tf.reduce_mean(per_example),
                "total_loss": total, "x_adv": x_adv, "learning_rate": learning_rate}

    return train_step


def make_batch_accuracy(model):
    """Accuracy on a batch with batch statistics and no moving-average update."""

    @tf.function
    def accuracy(x, y):
        logits = model(x, bn_mode="batch_frozen")
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))

    return accuracy


def seed_everything(config) -> None:
    """Seed initializers (tf_random_seed), as Madry's graph seed did."""
    keras.utils.set_random_seed(config.tf_random_seed)


def train(config, out=print) -> str:
    """Train as `python train.py` does; return the final checkpoint path."""
    seed_everything(config)
    dataset = data.load_dataset(config)
    model = build_model(config)
    optimizer = make_optimizer(config)
    optimizer.build(model.trainable_variables)
    os.makedirs(config.model_dir, exist_ok=True)
    checkpointer = checkpoints.Checkpointer(config.model_dir, model, optimizer)
    restored = checkpointer.restore_latest()
    start = int(optimizer.iterations.numpy())
    if restored:
        out(f"Resuming from {restored} at step {start}")
    # Keep the configuration with the model for reproducibility (Madry's comment).
    files.atomic_write_text(os.path.join(config.model_dir, "config.json"), config.to_json())

    batches = iter(data.train_pipeline(
        dataset.train_images, dataset.train_labels, config.training_batch_size,
        order_seed=config.np_random_seed, augment_seed=config.tf_random_seed,
        start_step=start, augmentation=config.augmentation))
    train_step = make_train_step(model, optimizer, config)
    batch_accuracy = make_batch_accuracy(model)
    nat_accuracy_attack = None
    writer = tf.summary.create_file_writer(config.model_dir)
    training_time = 0.0
    last_report = None

    for ii in range(start, config.max_num_training_steps):
        step, x, y = next(batches)
        if ii % config.num_checkpoint_steps == 0 and not (restored and ii == start):
            checkpointer.save(ii)
        report = ii % config.num_output_steps == 0
        if report:
            nat_acc = float(batch_accuracy(x, y))
        t0 = time.perf_counter()
        metrics = train_step(x, y, step)
        adv_acc = float(metrics["adv_accuracy"])  # also waits for the step to finish
        training_time += time.perf_counter() - t0
        if report:
            if config.training_method == "natural":
                # No attack in the step: measure robustness of this batch for the report.
                if nat_accuracy_attack is None:
                    nat_accuracy_attack = attacks.compile_pgd(model, config, "batch_frozen")
                x_pgd = nat_accuracy_attack(x, y, tf.constant([config.np_random_seed, ii],
                                                              tf.int64))
                adv_acc = float(batch_accuracy(x_pgd, y))
            out(f"Step {ii}:    ({datetime.datetime.now()})")
            out(f"    training nat accuracy {nat_acc * 100:.4}%")
            out(f"    training adv accuracy {adv_acc * 100:.4}%")
            if last_report is not None:
                out(f"    {config.num_output_steps * config.training_batch_size / training_time}"
                    f" examples per second")
            last_report = ii
            training_time = 0.0
        if ii % config.num_summary_steps == 0:
            _write_summaries(writer, ii, metrics)
    writer.flush()
    if restored and start >= config.max_num_training_steps:
        return restored
    return checkpointer.save(config.max_num_training_steps)


def _write_summaries(writer, step, metrics):
    """Madry's tags, as TF1 wrote them (spaces became underscores), plus two of ours."""
    acc, xent = metrics["adv_accuracy"], metrics["xent"]
    with writer.as_default(step=step):
        tf.summary.scalar("accuracy_adv_train", acc)
        tf.summary.scalar("accuracy_adv", acc)
        tf.summary.scalar("xent_adv_train", xent)
        tf.summary.scalar("xent_adv", xent)
        tf.summary.image("images_adv_train", metrics["x_adv"][:3] / 255.0, max_outputs=3)
        tf.summary.scalar("learning_rate", metrics["learning_rate"])
        tf.summary.scalar("loss_total", metrics["total_loss"])

