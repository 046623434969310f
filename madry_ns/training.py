"""Madry's adversarial training loop (cifar10_challenge `train.py`) in TF2, resumable.

Per step: attack the batch with PGD (in the BN mode `train_attack_bn_mode`; Madry's train-mode
model made every attack step update the moving averages, which `batch_update` keeps), then
one TF1-momentum update on the adversarial batch with mean cross-entropy plus
`weight_decay * sum(||W||^2 / 2)` over conv and dense kernels. Attack and update are one
compiled function. Console lines, TensorBoard tags and checkpoint names are Madry's.

Parts, as Madry's train.py is laid out: `setup` builds the model, optimizer, data,
checkpointer and the training attack (`TrainingAttack`, Madry's `LinfPGDAttack`, built once);
`run_loop` runs the steps (`TrainStep`, usable on its own), signals, non-finite steps and
checkpoints; `TrainingReport` writes the console lines and TensorBoard summaries. `train`
is the three in a row.

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
import json
import os
import signal
import threading
import time

import keras
import tensorflow as tf

from madry_ns import (attacks, checkpoints, data, distribute, files, finetune, rna, seeds,
                      selection, shaping)
from madry_ns.errors import UserError
from madry_ns.graph import function_for
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


def make_optimizer(config) -> keras.optimizers.Optimizer:
    """TF1 momentum with Madry's schedule; wrapped in dynamic loss scaling for float16."""
    optimizer = TF1Momentum(learning_rate_schedule(config.step_size_schedule), config.momentum)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def weight_decay_loss(model, variables=None):
    """Madry's `_decay`: sum of tf.nn.l2_loss (sum(w^2)/2) over conv and dense kernels
    (`variables`, default all of them; 0 for an empty list)."""
    variables = model.decay_variables() if variables is None else variables
    return tf.add_n([tf.nn.l2_loss(v) for v in variables]) if variables else tf.constant(0.0)


class TrainingAttack:
    """The training batch of every step, built once from the config and called per step:
    `attack(x, y, step) -> (x_train, p_clean_logits)`.

    The counterpart of Madry's `LinfPGDAttack(model, epsilon, num_steps, step_size,
    random_start, loss_func)`, which train.py constructs once and calls as
    `perturb(x_nat, y, sess)` on every batch. Settings come from the config: epsilon,
    num_steps, step_size, random_start, loss_func. Deviations from Madry's class:

    * the random start is a stateless draw of (np_random_seed, step), not numpy's global
      generator, so a resumed run repeats an uninterrupted one; under a tf.distribute
      strategy each replica takes its rows of one draw for the global batch, so the start
      does not depend on how the batch is split;
    * the attack runs in the BN mode `train_attack_bn_mode` (Madry: `batch_update`, his
      train-mode model, whose every attack step updated the moving averages; also
      `batch_frozen` or `population`);
    * `training_method: trades`: PGD on KL(p_clean || p_adv) from TRADES' Gaussian start
      (x + trades_init_std * N(0, 1)); `p_clean_logits` are the clean batch's logits in the
      attack's BN mode, the KL target. Otherwise `p_clean_logits` is None;
    * `shaping_ratio` n > 0: the first k = floor(n m / (n + 1)) rows stay clean and the rest
      are attacked, either through the mixed batch's statistics (`shaping_mode:
      attack_and_train`, the method) or as part of a fully attacked batch (`train_only`);
    * `training_method: natural`: the clean batch, no attack;
    * with RNA layers the attack and the update run on random paths
      (`rna.with_random_paths` wraps the attack);
    * with synchronized BN under a distribution the PGD loop is unrolled (a cross-replica
      all-reduce cannot sit inside a tf.while_loop).

    Called inside the training step's compiled function, per replica on the local batch.
    """

    def __init__(self, model, config):
        self.model, self.config = model, config
        self.params = dict(epsilon=config.epsilon, num_steps=config.num_steps,
                           step_size=config.step_size)
        self.trades = config.training_method == "trades"
        self.loss = "kl" if self.trades else config.loss_func
        self.bn_mode = config.train_attack_bn_mode
        self.ratio = config.shaping_ratio
        # A cross-replica all-reduce cannot sit inside a tf.while_loop.
        self.unroll = config.bn_sync == "synchronized" and config.distribution != "none"
        self._perturb = rna.with_random_paths(model, config, self._perturb_on_path)

    def __call__(self, x, y, step):
        """`perturb(x, y, step)`."""
        return self.perturb(x, y, step)

    def perturb(self, x, y, step):
        """(x_train, p_clean_logits) for the batch (x, y) of training step `step`."""
        return self._perturb(x, y, step)

    def start(self, x, seed):
        """The attack's starting point for every row of x (this replica's rows)."""
        config = self.config
        shape = x.shape.as_list()
        if self.trades:
            noise = distribute.replica_rows(
                lambda s: tf.random.stateless_normal(s, seed), shape)
            return x + config.trades_init_std * noise
        if not config.random_start:
            return x
        noise = distribute.replica_rows(lambda s: tf.random.stateless_uniform(
            s, seed, minval=-config.epsilon, maxval=config.epsilon), shape)
        return tf.clip_by_value(x + noise, attacks.PIXEL_MIN, attacks.PIXEL_MAX)

    def _attack_whole(self, x, y, seed, p_clean):
        model, bn_mode = self.model, self.bn_mode
        if self.trades:
            def kl_loss(x_adv):
                logits = model(x_adv, bn_mode=bn_mode)
                return tf.reduce_sum(shaping.kl_divergence(tf.stop_gradient(p_clean), logits))
            return attacks.pgd(kl_loss, x, seed=seed, x_init=self.start(x, seed),
                               unroll=self.unroll, **self.params)
        return attacks.pgd_attack(model, x, y, bn_mode=bn_mode, seed=seed, loss_func=self.loss,
                                  x_init=self.start(x, seed), unroll=self.unroll, **self.params)

    def _perturb_on_path(self, x, y, step):
        config, ratio = self.config, self.ratio
        if config.training_method == "natural":
            return x, None
        seed = seeds.training(config, step)
        p_clean = self.model(x, bn_mode=self.bn_mode) if self.trades else None
        if ratio == 0:
            return self._attack_whole(x, y, seed, p_clean), p_clean
        k, _ = shaping.shaping_split(int(x.shape[0]), ratio)
        if config.shaping_mode == "train_only":
            x_att = self._attack_whole(x, y, seed, p_clean)[k:]
        else:
            x_att = shaping.attack_slice(
                self.model, x, y, ratio=ratio, bn_mode=self.bn_mode, seed=seed,
                loss=self.loss, loss_scope=config.shaping_attack_loss, p_clean_logits=p_clean,
                x_init=self.start(x, seed)[k:], unroll=self.unroll, **self.params)
        return tf.concat([x[:k], x_att], 0), p_clean


def training_loss(model, config, x, x_train, y):
    """(total loss, logits on x_train, per-example CE on x_train) in the regime's BN mode
    (`finetune.forward_bn_mode`: batch_update, or population when the statistics are frozen).

    Madry: mean CE on the (possibly mixed) batch. TRADES: CE(clean) + beta * mean
    KL(p_clean || p_train) with the clean target not detached, as the reference; clean and
    adversarial batches go through separate forwards, each with its own statistics. With
    shaping, TRADES updates with plain CE on the mixed batch (the paper) unless
    shaping_trades_update is 'trades'. Plus Madry's weight decay over the trainable kernels.
    """
    global_batch = config.training_batch_size
    bn_mode = finetune.forward_bn_mode(config)
    logits = model(x_train, bn_mode=bn_mode)
    per_example = attacks.xent_loss(logits, y)
    trades_update = config.training_method == "trades" and (
        config.shaping_ratio == 0 or config.shaping_trades_update == "trades")
    if trades_update:
        clean_logits = model(x, bn_mode=bn_mode)
        loss = tf.nn.compute_average_loss(attacks.xent_loss(clean_logits, y),
                                          global_batch_size=global_batch)
        loss += config.trades_beta * tf.nn.compute_average_loss(
            shaping.kl_divergence(clean_logits, logits), global_batch_size=global_batch)
    else:
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
    decay = config.weight_decay * weight_decay_loss(model,
                                                    finetune.decay_variables(model, config))
    return loss + tf.nn.scale_regularization_loss(decay), logits, per_example


class TrainStep:
    """`step(x, y, step) -> metrics`: attack, loss and gradients in one compiled function,
    then, if the loss and every gradient are finite, the update in a second one.

    `attack` is the run's `TrainingAttack` (built from the config when not given). The step
    holds no loop state, so it can be driven from outside `train()` (a Keras `fit`).

    The split lets a non-finite step leave the weights and optimizer untouched without a
    `tf.cond` around `apply_gradients` (which cannot merge across replicas). With
    `on_nonfinite: "skip"` the BN moving statistics the attack and forward changed are put
    back too and the step counter still advances, so data order and learning rate stay
    aligned with the step. `metrics["finite"]` says whether the update was applied.

    Both functions run their body with `strategy.run` (the strategy in scope when the step is
    built; the default one is a single device): x and y may be per-replica values from
    `distribute.distribute_batch`, and metrics come back reduced over replicas.
    """

    def __init__(self, model, optimizer, config, attack: TrainingAttack | None = None):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.strategy = tf.distribute.get_strategy()
        self.train_vars = finetune.trainable_variables(model, config)
        self.bn_stats = [v for bn in model.bn_layers()
                         for v in (bn.moving_mean, bn.moving_variance)]
        self.adversary = attack if attack is not None else TrainingAttack(model, config)
        # AutoGraph off for the toolkit's own models (why: madry_ns.graph).
        compile_fn = function_for(model)
        self._compute = compile_fn(self._compute_fn)
        self._apply = compile_fn(self._apply_fn)
        self._snapshot = compile_fn(
            lambda: self.strategy.run(lambda: [tf.identity(v) for v in self.bn_stats]))
        self._restore = compile_fn(self._restore_fn)

    def _replica_compute(self, x, y, step):
        x_train, _ = self.adversary(x, y, step)
        with tf.GradientTape() as tape:
            total, logits, per_example = training_loss(self.model, self.config, x, x_train, y)
            scaled = self.optimizer.scale_loss(total) if self.loss_scaling else total
        grads = tape.gradient(scaled, self.train_vars)
        # Under loss scaling an overflowing gradient is routine: the optimizer skips the
        # update and halves the scale. Only a non-finite loss is a fault there.
        finite = tf.reduce_all(([] if self.loss_scaling else
                                [tf.reduce_all(tf.math.is_finite(g)) for g in grads])
                               + [tf.math.is_finite(total)])
        # The "adv" metrics cover the attacked rows only (all rows without shaping).
        a = slice(shaping.shaping_split(int(x.shape[0]), self.config.shaping_ratio)[0]
                  if self.config.shaping_ratio else 0, None)
        correct = tf.cast(tf.equal(tf.argmax(logits[a], 1), y[a]), tf.float32)
        return grads, {"adv_accuracy": tf.reduce_mean(correct),
                       "xent": tf.reduce_mean(per_example[a]), "total_loss": total,
                       "x_adv": x_train[a], "nonfinite": 1 - tf.cast(finite, tf.int32)}

    def _compute_fn(self, x, y, step):
        s, op = self.strategy, tf.distribute.ReduceOp
        grads, m = s.run(self._replica_compute, args=(x, y, step))
        return grads, {
            "adv_accuracy": s.reduce(op.MEAN, m["adv_accuracy"], axis=None),
            "xent": s.reduce(op.MEAN, m["xent"], axis=None),
            "total_loss": s.reduce(op.SUM, m["total_loss"], axis=None),  # global-batch mean
            "x_adv": s.experimental_local_results(m["x_adv"])[0],
            "finite": tf.equal(s.reduce(op.SUM, m["nonfinite"], axis=None), 0),
            # Read before the update increments `iterations`: this step's rate.
            "learning_rate": tf.identity(self.optimizer.learning_rate)}

    def _apply_fn(self, grads):
        if not self.train_vars:  # BN statistics only: nothing to update, the step still counts
            self.optimizer.iterations.assign_add(1)
            return tf.constant(True)

        def apply(grads):
            # Identities place the gradients on this replica's device: arriving as function
            # inputs they have none, and a multi-worker all-reduce needs one.
            grads = [tf.identity(g) for g in grads]
            self.optimizer.apply_gradients(zip(grads, self.train_vars))
            return 1 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                              for v in self.train_vars]), tf.int32)

        nonfinite = self.strategy.run(apply, args=(grads,))
        return tf.equal(self.strategy.reduce(tf.distribute.ReduceOp.SUM, nonfinite, axis=None), 0)

    def _restore_fn(self, values):
        def restore(values):
            for var, value in zip(self.bn_stats, values):
                var.assign(value)

        self.strategy.run(restore, args=(values,))
        self.optimizer.iterations.assign_add(1)

    def __call__(self, x, y, step):
        skip = self.config.on_nonfinite == "skip"
        saved = self._snapshot() if skip else None
        grads, metrics = self._compute(x, y, step)
        if bool(metrics["finite"]):
            before = int(self.optimizer.iterations.numpy())
            metrics["weights_finite"] = bool(self._apply(grads))
            if int(self.optimizer.iterations.numpy()) == before:
                # Loss scaling skipped an overflowing update; the step still counts, so the
                # step counter keeps naming the data and learning rate of the next step.
                self.optimizer.iterations.assign_add(1)
        elif skip:
            self._restore(saved)
        return metrics


def make_train_step(model, optimizer, config, attack=None) -> TrainStep:
    """See `TrainStep`."""
    return TrainStep(model, optimizer, config, attack)


class TrainingStopped(UserError):
    """Training ended early: interrupted by a signal, or a non-finite loss or weight."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def make_batch_accuracy(model, bn_mode: str = "batch_frozen"):
    """Accuracy on a batch, by default with batch statistics and no moving-average update."""

    @function_for(model)
    def accuracy(x, y):
        logits = model(x, bn_mode=bn_mode)
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))

    return accuracy


def seed_everything(config) -> None:
    """Seed initializers (tf_random_seed), as Madry's graph seed did."""
    keras.utils.set_random_seed(config.tf_random_seed)


class TrainingSetup:
    """What Madry's train.py builds before its loop, built once by `setup(config, out)`:
    the strategy, model, optimizer, data batches, checkpointer (restored from the latest
    checkpoint of model_dir, else initialized from `init_checkpoint`), the training attack
    and the step. `start` is the first step to run; `save(step)` writes `checkpoint-<step>`.
    With `select_best`, `selector` is the run's `selection.Selector` (else None) and
    `select(step)` measures a checkpoint; a resumed run measures its restored checkpoint
    first if that measurement is missing.
    """

    def __init__(self, config, out=print):
        self.config = config
        self.strategy = strategy = distribute.make_strategy(config)
        distribute.check_batch(config, strategy.num_replicas_in_sync)
        self.chief = chief = distribute.is_chief(strategy)
        self.out = out if chief else _silent  # the chief alone prints
        seed_everything(config)
        # With select_best 'heldout' the held-out images leave the training set here,
        # before anything trains on them.
        self.dataset, selection_data, heldout = selection.split(config,
                                                                data.load_dataset(config))
        with strategy.scope():
            self.model = model = build_model(config)
            self.optimizer = optimizer = make_optimizer(config)
            optimizer.build(finetune.trainable_variables(model, config))
        if chief:
            os.makedirs(config.model_dir, exist_ok=True)
        self.save_dir = distribute.WorkerCheckpointDir(config.model_dir, chief, strategy)
        self.checkpointer = checkpoints.Checkpointer(config.model_dir, model, optimizer,
                                                     save_dir=self.save_dir.path,
                                                     max_to_keep=config.max_to_keep)
        self.restored = self.checkpointer.restore_latest()
        self.start = int(optimizer.iterations.numpy())
        if self.restored:
            self.out(f"Resuming from {self.restored} at step {self.start}")
        else:
            finetune.initialize(model, config, self.out)
        if config.trainable != "all":  # Madry's console stays as it was for full training
            self.out(finetune.describe(model, config))
        if self.restored:
            selection.check_resume(config)
        if chief:  # keep the configuration with the model for reproducibility (Madry's comment)
            files.atomic_write_text(os.path.join(config.model_dir, "config.json"),
                                    config.to_json())
        self.last_saved = self.restored
        self.batches = iter(data.train_pipeline(
            self.dataset.train_images, self.dataset.train_labels, config.training_batch_size,
            order_seed=config.np_random_seed, augment_seed=config.tf_random_seed,
            start_step=self.start, augmentation=config.augmentation))
        with strategy.scope():
            self.attack = TrainingAttack(model, config)
            self.train_step = make_train_step(model, optimizer, config, self.attack)
        self.selector = None
        if selection_data is not None:
            self.selector = selection.Selector(config, model, optimizer, selection_data,
                                               heldout, out=self.out)
            if self.restored:  # killed before the latest checkpoint was measured
                self.select(checkpoints.checkpoint_step(self.restored))

    def select(self, step) -> None:
        """With `select_best`: measure the model, which holds `checkpoint-<step>`'s weights,
        unless that step is measured already or is not a selection step."""
        if self.selector is not None and self.selector.pending(step):
            self.selector.measure(step)

    def save(self, step) -> str:
        """Write `checkpoint-<step>` (per-replica BN statistics averaged first); its path."""
        if self.config.bn_sync == "per_replica":
            distribute.average_bn_statistics(self.strategy, self.model)
        path = os.path.join(self.config.model_dir,
                            os.path.basename(self.checkpointer.save(step)))
        self.last_saved = path
        return path


def setup(config, out=print) -> TrainingSetup:
    """See `TrainingSetup`."""
    return TrainingSetup(config, out)


class TrainingReport:
    """Madry's console lines (every `num_output_steps`: clean and adversarial accuracy of
    the batch, examples per second) and TensorBoard summaries (every `num_summary_steps`).

    The clean accuracy is measured before the step's update (`before_step`), in
    `finetune.report_bn_mode`; natural training has no attack in its step, so the report
    attacks the batch itself for the adversarial accuracy. Only the chief writes events.
    """

    def __init__(self, run: TrainingSetup):
        self.run, self.config, self.out = run, run.config, run.out
        self.batch_accuracy = make_batch_accuracy(run.model,
                                                  finetune.report_bn_mode(run.config))
        self._nat_accuracy_attack = None
        self.writer = tf.summary.create_file_writer(run.config.model_dir) if run.chief \
            else tf.summary.create_noop_writer()
        write_hparams(self.writer, run.config)
        self.training_time = 0.0
        self.last_report = None
        self._nat_acc = None

    def reports(self, ii) -> bool:
        """Whether step `ii` prints Madry's console lines."""
        return ii % self.config.num_output_steps == 0

    def before_step(self, ii, x, y) -> None:
        """Measure the clean accuracy of the batch of a reporting step, before its update."""
        if self.reports(ii):
            self._nat_acc = float(self.batch_accuracy(x, y))

    def add_time(self, seconds: float) -> None:
        """Count a step's duration towards the next examples-per-second line."""
        self.training_time += seconds

    def after_step(self, ii, x, y, metrics) -> None:
        """The console lines and summaries of a step whose update went through."""
        config, out = self.config, self.out
        if self.reports(ii):
            adv_acc = float(metrics["adv_accuracy"])
            if config.training_method == "natural":
                adv_acc = self._natural_adv_accuracy(ii, x, y)
            out(f"Step {ii}:    ({datetime.datetime.now()})")
            out(f"    training nat accuracy {self._nat_acc * 100:.4}%")
            out(f"    training adv accuracy {adv_acc * 100:.4}%")
            if self.last_report is not None:
                rate = config.num_output_steps * config.training_batch_size / self.training_time
                out(f"    {rate} examples per second")
            self.last_report = ii
            self.training_time = 0.0
        if ii % config.num_summary_steps == 0:
            _write_summaries(self.writer, ii, metrics)

    def _natural_adv_accuracy(self, ii, x, y) -> float:
        # No attack in the step: measure this batch's robustness for the report.
        config = self.config
        if self._nat_accuracy_attack is None:
            self._nat_accuracy_attack = attacks.compile_pgd(
                self.run.model, config, finetune.report_bn_mode(config))
        x_pgd = self._nat_accuracy_attack(x, y, seeds.training(config, ii))
        return float(self.batch_accuracy(x_pgd, y))

    def flush(self) -> None:
        self.writer.flush()


def run_loop(run: TrainingSetup, report: TrainingReport) -> str:
    """Madry's loop from `run.start` to max_num_training_steps; the final checkpoint path.

    Per step: stop on a signal (saving `checkpoint-<step>` first), take the batch, write
    the periodic checkpoint (before the step's attack, so resuming repeats the step), run
    the step, handle a non-finite step (`_nonfinite`), report.
    """
    config = run.config
    with _StopOnSignals() as stop:
        for ii in range(run.start, config.max_num_training_steps):
            if stop.signum is not None:
                path = run.last_saved if (run.last_saved and checkpoints.checkpoint_step(
                    run.last_saved) == ii) else run.save(ii)
                raise TrainingStopped(
                    f"interrupted by {signal.Signals(stop.signum).name} at step {ii}: "
                    f"saved {path}; run train.py again to resume", 128 + stop.signum)
            step, x, y = next(run.batches)
            if ii % config.num_checkpoint_steps == 0 and not (run.restored and ii == run.start):
                run.save(ii)
                run.select(ii)
            report.before_step(ii, x, y)
            t0 = time.perf_counter()
            metrics = run.train_step(*distribute.distribute_batch(run.strategy, x, y), step)
            finite = bool(metrics["finite"])  # also waits for the step to finish
            report.add_time(time.perf_counter() - t0)
            if not finite or not metrics.get("weights_finite", True):
                _nonfinite(config, ii, metrics, run.last_saved, run.out)
                continue
            report.after_step(ii, x, y, metrics)
        report.flush()
        if run.restored and run.start >= config.max_num_training_steps:
            path = run.restored
        else:
            path = run.save(config.max_num_training_steps)
            run.select(config.max_num_training_steps)
        save_final_model(run)
        return path


def save_final_model(run: TrainingSetup) -> str | None:
    """With `save_keras`, the trained model as `model_dir/model.keras` (written by the chief,
    atomically; after the final checkpoint, so BN statistics are those it holds); its path,
    else None. `madry_ns.load_model` reads it back."""
    if not run.config.save_keras or not run.chief:
        return None
    path = os.path.join(run.config.model_dir, checkpoints.KERAS_MODEL)
    checkpoints.save_keras(run.model, path)
    return path


def train(config, out=print) -> str:
    """Train as `python train.py` does; return the final checkpoint path.

    `setup` (model, optimizer, data, checkpointer, attack), `run_loop` (steps, signals,
    non-finite steps, checkpoints) and `TrainingReport` (console, TensorBoard).
    SIGINT and SIGTERM finish the running step, write `checkpoint-<step>` and raise
    `TrainingStopped` (exit status 128 + signal); running again resumes there. A non-finite
    loss, gradient or weight stops training (`on_nonfinite: "stop"`) without saving, so the
    last good checkpoint stays the latest, or skips the batch ("skip", logged to the console
    and `model_dir/nonfinite.jsonl`). With `distribution` set, the same loop runs under a
    tf.distribute strategy (see `madry_ns.distribute`); only the chief writes. With
    `select_best`, every periodic and the final checkpoint is measured and the best kept in
    `model_dir/best` (`madry_ns.selection`).
    """
    run = setup(config, out)
    report = TrainingReport(run)
    try:
        return run_loop(run, report)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.AbortedError) as e:
        if config.distribution != "multi_worker":
            raise
        raise TrainingStopped(
            f"a worker failed or stopped answering ({type(e).__name__}); training stopped. "
            f"Restart every worker: they resume from the latest checkpoint "
            f"({tf.train.latest_checkpoint(config.model_dir) or 'none yet'}).", 1) from None
    finally:
        if run.selector is not None:
            run.selector.close()
        run.save_dir.cleanup()


def _silent(*args, **kwargs):
    del args, kwargs


def _nonfinite(config, step, metrics, last_saved, out):
    what = "loss or gradient" if not bool(metrics["finite"]) else "weight after the update"
    loss = float(metrics["total_loss"])
    if config.on_nonfinite == "skip" and not bool(metrics["finite"]):
        out(f"Step {step}: non-finite {what} (loss {loss}); batch skipped "
            f"(on_nonfinite: skip)")
        files.atomic_append_line(os.path.join(config.model_dir, "nonfinite.jsonl"),
                                 json.dumps({"step": step, "loss": str(loss)}))
        return
    raise TrainingStopped(
        f"non-finite {what} at step {step} (loss {loss}); training stopped without saving, so "
        f"the latest checkpoint is still the last good one ({last_saved or 'none yet'}). "
        f"Lower the learning rate or check the data; on_nonfinite: \"skip\" skips such "
        f"batches instead.", 1)


class _StopOnSignals:
    """Record SIGINT/SIGTERM instead of dying mid-step (main thread only)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# The HParams dashboard's metric columns: the latest value of these scalars in model_dir
# (train.py's) and model_dir/eval (eval.py's), for each run.
HPARAMS_METRICS = (("accuracy_adv_train", None), ("xent_adv_train", None), ("loss_total", None),
                   ("accuracy nat", "eval"), ("accuracy adv eval", "eval"))


def write_hparams(writer, config) -> None:
    """The run's config as TensorBoard hyperparameters (HParams plugin), every key with its
    value (lists and null as their JSON text, since hparams are numbers, booleans or strings),
    and `HPARAMS_METRICS` as its metrics; at every start, so a resumed run has them too."""
    from tensorboard.plugins.hparams import api as hp

    values = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
              for key, value in config.to_dict().items()}
    with writer.as_default(step=0):
        hp.hparams_config(hparams=[hp.HParam(key) for key in values],
                          metrics=[hp.Metric(tag, group=group) for tag, group in HPARAMS_METRICS])
        hp.hparams(values)


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

