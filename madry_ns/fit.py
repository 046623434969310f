"""Adversarial training through Keras' `fit()`: `AdversarialTrainer(model, config, **settings)`.

The trainer wraps a classifier (one of the toolkit's models, or a plain Keras classifier
mapping 0-255 images to logits) in a `keras.Model` whose training step is train.py's own:
the run's `training.TrainingAttack` and `training.TrainStep` (Madry PGD, TRADES, every
shaping mode, the BN-only regimes of `trainable`, RNA paths; TF1 momentum, Madry's schedule
and weight decay), so `fit` and train.py compute the same update from the same batch and step.
Settings are the config's keys by name, or a `madry_ns.config.Config` (or a dict of keys),
with keywords overriding single keys.

Example (a few steps on the offline digits; `madry_ns.fit.training_data` gives train.py's
batches, in its order and augmentation)::

    import keras
    import madry_ns
    from madry_ns import config as config_lib, fit, models

    config = config_lib.from_dict({"dataset": "digits", "model": "resnet20",
                                   "model_width": 1, "training_batch_size": 16,
                                   "num_steps": 2, "epsilon": 32.0, "step_size": 10.0})
    keras.utils.set_random_seed(config.tf_random_seed)
    trainer = madry_ns.AdversarialTrainer(models.build_model(config), config)
    trainer.compile()  # TF1 momentum with step_size_schedule; or pass an optimizer
    trainer.fit(fit.training_data(config), steps_per_epoch=3, epochs=1, verbose=0)
    trainer.classifier.save("model.keras")  # the trained network

The step reads its seeds from the optimizer's iteration count (`seeds.training(config,
iterations)`), so a run resumed by `keras.callbacks.BackupAndRestore` draws what an
uninterrupted one would. What fit feeds is the caller's: BackupAndRestore (Keras 3) resumes at
the start of the interrupted epoch and iterates the data anew, so for a resumed run to equal
an uninterrupted one every epoch must see the same batches (a finite dataset, `shuffle=False`,
e.g. `training_data(config).take(steps_per_epoch)`); an endless `training_data` stream with
`steps_per_epoch` starts over at step 0's batch when resumed.

Where this differs from train.py:

* console lines, progress and logs are Keras' (`loss`, the total training loss; `adv_accuracy`
  and `xent` on the attacked rows; epoch means, as Keras' metrics); Madry's console lines,
  TensorBoard tags and `checkpoint-N` files stay train.py's. The Keras callbacks
  (TensorBoard, ModelCheckpoint, CSVLogger, EarlyStopping, BackupAndRestore) see these logs;
* no checkpoints, model_dir, `config.json` copy, resume or signal handling of its own (that
  is what Keras' callbacks do); `max_num_training_steps` and the `num_*_steps` keys are
  unused: fit's `epochs` and `steps_per_epoch` decide;
* the batch size is the data's; it must equal `training_batch_size` (the loss is averaged
  over it and shaping splits it), and every batch must be full;
* the strategy is the one in scope when the trainer is built (Keras' convention), and the
  model decides its normalization: `distribution`, `bn_sync` (from the model's
  `synchronized`), `norm_layer`, `precision` (from the model's dtype policy), `model*` and
  `dataset` describe how train.py builds a model and are not read from the settings
  (`norm_layer: "rna"` with a model that has no RNA layers, or `distribution` other than
  "none" outside a strategy, is refused);
  per-replica BN statistics are averaged over the replicas at the end of every epoch and of
  training (train.py: before every checkpoint), so a ModelCheckpoint with a batch
  `save_freq` under several replicas may hold replica 0's statistics;
* a non-finite loss or gradient raises `training.TrainingStopped` (`on_nonfinite: "stop"`:
  parameters and optimizer untouched; the BN statistics the step's forwards moved stay moved,
  which train.py never saves) or skips the batch with a warning ("skip": statistics put back
  too, the step counted); nothing is written to `nonfinite.jsonl`;
* `init_checkpoint` (with `reset_bn_stats`) is loaded when the trainer is built;
* best-checkpoint selection (`select_best` other than "none") is refused with a
  `ConfigError`: it measures train.py's checkpoints, which fit does not write, and its
  held-out images would have to leave a training stream the caller builds; train with
  train.py, or evaluate saved models afterwards;
* the run's hyperparameters reach TensorBoard's hparams plugin through the `HParams`
  callback (every config key, as the step reads it);
* `trainer.save(path)` saves the classifier (what `keras.saving.load_model` reads back), so
  `ModelCheckpoint("....keras")` writes the trained network; `trainer(x)` is the
  classifier's population-statistics forward; `compile`'s `loss` and `metrics` serve
  `evaluate` only (clean inputs, population statistics); `jit_compile` and `run_eagerly`
  do not change the step, which is always train.py's compiled functions.

Plain Keras classifiers (e.g. `keras.Sequential` with `keras.layers.BatchNormalization`)
train with Madry PGD, TRADES and natural training: their BN layers called with
`training=True` normalize with the batch and update the moving averages (the toolkit's
`batch_update`, train_attack_bn_mode's default), with `training=False` they use the moving
averages (`population`). What needs the toolkit's BN modes is refused with a `ConfigError`
before training: `train_attack_bn_mode: "batch_frozen"` (a Keras BN layer cannot normalize
with the batch without updating its averages), `shaping_ratio` > 0, `trainable` other than
"all", `norm_layer: "rna"` and `init_checkpoint`. Such a model gets no per-image
standardization from the toolkit (add it to the model if wanted); dropout and other
randomness in it are Keras' own and not seeded by the step.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from madry_ns import config as config_lib
from madry_ns import data, distribute, finetune, training
from madry_ns.errors import ConfigError, UserError
from madry_ns.models import is_toolkit_model

__all__ = ["AdversarialTrainer", "HParams", "hparams_values", "training_data",
           "resolve_config"]

# What a plain Keras model cannot do, checked before training: (key, refused value test, why).
_PLAIN_KERAS_LIMITS = (
    ("train_attack_bn_mode", lambda v: v == "batch_frozen",
     "needs batch statistics without a moving-average update, which a Keras "
     "BatchNormalization layer has no mode for (training=True always updates them); use "
     "'batch_update' (Madry's, the default) or 'population', or one of madry_ns' models"),
    ("shaping_ratio", lambda v: v != 0,
     "batch-norm shaping runs the attack through the mixed batch's statistics without "
     "updating them (the toolkit's 'batch_frozen' BN mode), which a Keras "
     "BatchNormalization layer has no mode for; use one of madry_ns' models"),
    ("trainable", lambda v: v != "all",
     "the BN-only regimes select the toolkit's BN layers (and first convolution and logit "
     "layer) and their statistics modes; use one of madry_ns' models"),
    ("norm_layer", lambda v: v == "rna",
     "RNA needs the toolkit's RandomNorm layers; use one of madry_ns' models built with "
     "norm_layer 'rna'"),
    ("init_checkpoint", lambda v: v is not None,
     "it is read into madry_ns' models only; load the weights into the Keras model "
     "yourself"),
)


def resolve_config(config=None, **settings) -> config_lib.Config:
    """The `Config` of `config` (None: the defaults; a dict of keys, or a `Config`) with
    `settings` (config keys by name) replacing single keys, validated as a config file is."""
    if config is None:
        config = {}
    if isinstance(config, config_lib.Config):
        return config.replace(**settings) if settings else config
    if isinstance(config, dict):
        return config_lib.from_dict({**config, **settings}, source="AdversarialTrainer")
    raise ConfigError(f"AdversarialTrainer: config is a {type(config).__name__}; expected a "
                      f"madry_ns.config.Config, a dict of config keys, or None")


def training_data(config, images=None, labels=None, start_step: int = 0) -> tf.data.Dataset:
    """train.py's batches as an endless `tf.data.Dataset` of (images, labels): the data
    order of `np_random_seed`, the augmentation of `augmentation` and `tf_random_seed`,
    `training_batch_size` rows, from step `start_step` on. `images` (uint8 or float, 0-255,
    NHWC) and `labels` default to the training split of the config's `dataset`."""
    if images is None or labels is None:
        dataset = data.load_dataset(config)
        images, labels = dataset.train_images, dataset.train_labels
    pipeline = data.train_pipeline(images, labels, config.training_batch_size,
                                   order_seed=config.np_random_seed,
                                   augment_seed=config.tf_random_seed, start_step=start_step,
                                   augmentation=config.augmentation)
    return pipeline.map(lambda step, x, y: (x, y))


class _PlainKeras:
    """A plain Keras classifier seen through the toolkit's model interface
    (`model(x, bn_mode=...)`, `bn_layers()`, `decay_variables()`), for the training step.
    `batch_update` is Keras' training=True, `population` its training=False."""

    def __init__(self, model, config):
        self.model, self.config = model, config
        layers = list(model._flatten_layers(include_self=False, recursive=True))
        self._bn = [layer for layer in layers
                    if isinstance(layer, keras.layers.BatchNormalization)]
        self._kernels = [layer.kernel for layer in layers
                         if isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D,
                                               keras.layers.Conv2D, keras.layers.Conv3D))]
        self.synchronized = any(getattr(bn, "synchronized", False) for bn in self._bn)

    def __call__(self, x, bn_mode="population"):
        if bn_mode not in ("population", "batch_update"):  # refused before training
            raise ConfigError(f"BN mode {bn_mode!r} is not available on a plain Keras model")
        return self.model(x, training=bn_mode == "batch_update")

    @property
    def trainable_variables(self):
        return self.model.trainable_variables

    def bn_layers(self) -> list:
        return self._bn

    def decay_variables(self) -> list:
        """Madry's decayed kernels (Dense and Conv), or every trainable variable with
        `weight_decay_variables: "all"`."""
        if self.config.weight_decay_variables == "all":
            return list(self.model.trainable_variables)
        return list(self._kernels)


def _effective_config(model, config, toolkit: bool, net) -> config_lib.Config:
    """The config the training step reads: the given settings, with the strategy in scope
    and the model's normalization in place of the keys that describe how train.py builds
    them (see the module docstring)."""
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if config.distribution != "none" and not tf.distribute.has_strategy():
        raise ConfigError(f"key 'distribution' has value {config.distribution!r}, but no "
                          f"tf.distribute strategy is in scope: build the model and the "
                          f"trainer inside `with strategy.scope():` (fit then runs under it)")
    if toolkit and config.norm_layer == "rna" and not model.rna_layers():
        raise ConfigError("key 'norm_layer' has value 'rna', but the model has no RNA layers; "
                          "build it with norm_layer 'rna' (madry_ns.models.build_model)")
    synchronized = bool(model.synchronized if toolkit else net.synchronized)
    changes = {"distribution": "mirrored" if replicas > 1 else "none",
               "bn_sync": "synchronized" if synchronized else "per_replica"}
    if toolkit:
        changes["norm_layer"] = model.norm_layer
    policy = getattr(getattr(model, "dtype_policy", None), "name", None)
    if policy in ("float32", "mixed_float16", "mixed_bfloat16"):
        changes["precision"] = policy  # loss scaling follows the model's float16 compute
    effective = config.replace(**changes)
    distribute.check_batch(effective, replicas)
    return effective


def _check_plain_keras(config) -> None:
    for key, refused, why in _PLAIN_KERAS_LIMITS:
        value = getattr(config, key)
        if refused(value):
            raise ConfigError(f"key '{key}' has value {value!r}, which a plain Keras model "
                              f"cannot train with: {why}")


class _AverageReplicaStatistics(keras.callbacks.Callback):
    """Per-replica BN statistics set to their mean over the replicas at the end of every
    epoch and of training, before the other callbacks save anything."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def _average(self):
        distribute.average_bn_statistics(self.trainer.distribute_strategy, self.trainer._net)

    def on_epoch_end(self, epoch, logs=None):
        self._average()

    def on_train_end(self, logs=None):
        self._average()


class _RunningMeans:
    """The training logs: means since the epoch began, as Keras' metrics report (kept out of
    `trainer.metrics`, so `evaluate` reports only what `compile` asked for)."""

    def __init__(self, names):
        self.names = names
        self.reset()

    def reset(self):
        self.sums, self.count = dict.fromkeys(self.names, 0.0), 0

    def add(self, **values):
        for name, value in values.items():
            self.sums[name] += float(value)
        self.count += 1

    def result(self) -> dict:
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}


class AdversarialTrainer(keras.Model):
    """A `keras.Model` whose `fit` trains `model` adversarially, as train.py does.

    `model`: one of the toolkit's models (`madry_ns.models.build_model`), or a built plain
    Keras classifier mapping 0-255 images to logits (see the module docstring for what it can
    train with). `config`: a `madry_ns.config.Config`, a dict of config keys, or None (the
    defaults, Madry's); `settings`: config keys by name, overriding single keys of `config`
    (`AdversarialTrainer(model, training_method="trades", training_batch_size=64)`).

    Call `compile()` (the optimizer defaults to train.py's: TF1 momentum with
    `step_size_schedule` and `momentum`, loss scaling under mixed_float16), then `fit` on
    batches of `training_batch_size` rows. Each step is `training.TrainStep` of the step
    `optimizer.iterations`: the training attack of the config, then one update. `classifier`
    is the wrapped model; `config` the settings as the step reads them. Deviations from
    train.py: see `madry_ns.fit`.
    """

    def __init__(self, model, config=None, **settings):
        super().__init__(name="adversarial_trainer")
        if not getattr(model, "built", False) or not model.variables:
            raise UserError("AdversarialTrainer: the model has no variables yet; build it "
                            "first (madry_ns.models.build_model does; a Keras model: start it "
                            "with keras.Input(shape) or call it on a batch)")
        config = resolve_config(config, **settings)
        if config.select_best != "none":
            raise ConfigError(f"key 'select_best' has value {config.select_best!r}, but "
                              f"AdversarialTrainer (fit) writes no checkpoints to select "
                              f"from; use 'none' here, or train with train.py "
                              f"(python -m madry_ns.train), which measures every checkpoint")
        self.toolkit = is_toolkit_model(model)
        if not self.toolkit:
            _check_plain_keras(config)
        self.classifier = model
        self._net = model if self.toolkit else _PlainKeras(model, config)
        self.config = _effective_config(model, config, self.toolkit, self._net)
        if self.toolkit:
            finetune.initialize(model, self.config, out=_quiet)
        self._means = _RunningMeans(("loss", "adv_accuracy", "xent"))
        self._step = None
        self.built = True

    def call(self, x, training=False):
        """The classifier's inference forward (population statistics)."""
        del training
        return self.classifier(x, training=False)

    def compile(self, optimizer=None, **kwargs):
        """Keras' `compile`; `optimizer` defaults to `training.make_optimizer(config)`.
        `jit_compile` defaults to False (the step is train.py's compiled functions) and
        `steps_per_execution` must stay 1."""
        if kwargs.get("steps_per_execution", 1) != 1:
            raise UserError("AdversarialTrainer.compile: steps_per_execution must be 1 (each "
                            "step checks its loss for finiteness on the host, as train.py)")
        kwargs.setdefault("jit_compile", False)
        with self.distribute_strategy.scope():
            if optimizer is None:
                optimizer = training.make_optimizer(self.config)
            super().compile(optimizer=optimizer, **kwargs)
            self.optimizer.build(finetune.trainable_variables(self._net, self.config))
            self._step = training.TrainStep(self._net, self.optimizer, self.config)

    def reset_metrics(self):
        """Keras' metrics and the training logs' epoch means."""
        super().reset_metrics()
        self._means.reset()

    def get_metrics_result(self):
        """Keras' metric results, leaving out compile metrics no evaluation has built yet
        (training does not feed them: its logs are the trainer's own)."""
        results = {}
        for metric in self.metrics:
            if getattr(metric, "built", True) is False:
                continue
            result = metric.result()
            results.update(result if isinstance(result, dict) else {metric.name: result})
        if not tf.executing_eagerly():  # called inside evaluate's compiled test step
            return results
        return {name: np.asarray(value).item() if np.size(value) == 1 else np.asarray(value)
                for name, value in results.items()}

    def make_train_function(self, force=False):
        """The step that `fit` calls per batch: `_train_batch` (see `TrainStep`)."""
        if self.train_function is None or force:
            self.train_function = self._train_batch
        return self.train_function

    def _train_batch(self, iterator):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(next(iterator))
        if sample_weight is not None or y is None:
            raise UserError("AdversarialTrainer.fit: expected batches of (images, labels), "
                            "without sample weights")
        self._check_rows(x)
        step = int(self.optimizer.iterations.numpy())
        metrics = self._step(x, y, tf.constant(step, tf.int64))
        if not bool(metrics["finite"]) or not metrics.get("weights_finite", True):
            self._nonfinite(step, metrics)
        else:
            self._means.add(loss=metrics["total_loss"], adv_accuracy=metrics["adv_accuracy"],
                            xent=metrics["xent"])
        return self._means.result()

    def _check_rows(self, x):
        parts = self.distribute_strategy.experimental_local_results(x)
        shapes = [p.shape[0] for p in parts]
        rows = None if None in shapes else sum(int(s) for s in shapes)
        if rows != self.config.training_batch_size:
            raise ConfigError(
                f"AdversarialTrainer.fit: a batch of {rows if rows is not None else 'unknown'} "
                f"rows, but training_batch_size is {self.config.training_batch_size}: every "
                f"batch must have training_batch_size rows (the loss is averaged over it and "
                f"shaping splits it); set training_batch_size to fit's batch size and drop a "
                f"partial last batch (tf.data: batch(..., drop_remainder=True))")

    def _nonfinite(self, step, metrics):
        loss = float(metrics["total_loss"])
        if self.config.on_nonfinite == "skip" and not bool(metrics["finite"]):
            warnings.warn(f"step {step}: non-finite loss or gradient (loss {loss}); batch "
                          f"skipped (on_nonfinite: skip)", RuntimeWarning, stacklevel=3)
            return
        what = "loss or gradient" if not bool(metrics["finite"]) else "weight after the update"
        raise training.TrainingStopped(
            f"non-finite {what} at step {step} (loss {loss}); the update was not applied. "
            f"Lower the learning rate or check the data; on_nonfinite: \"skip\" skips such "
            f"batches instead", 1)

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras' `fit`, with per-replica BN statistics averaged over the replicas at the
        end of every epoch (before the caller's callbacks) under a multi-replica strategy."""
        callbacks = list(callbacks or [])
        if (self.distribute_strategy.num_replicas_in_sync > 1
                and self.config.bn_sync == "per_replica"):
            callbacks.insert(0, _AverageReplicaStatistics(self))
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def save(self, filepath, *args, **kwargs):
        """Save the classifier (the trained network), e.g. as `.keras`."""
        return self.classifier.save(filepath, *args, **kwargs)


def hparams_values(config) -> dict:
    """Every config key as a TensorBoard hparams value (bool, int, float or str): lists as
    their JSON text, null as the string "null"."""
    import json

    values = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            values[key] = json.dumps(value)
    return values


class HParams(keras.callbacks.Callback):
    """A Keras callback that writes the run's hyperparameters (the trainer's `config`, every
    key; `hparams_values`) to TensorBoard's hparams plugin in `log_dir` when training begins.
    Give it the TensorBoard callback's `log_dir`, so the dashboard pairs them with the run's
    scalars: `fit(..., callbacks=[TensorBoard(d), HParams(d)])`."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir

    def on_train_begin(self, logs=None):
        from tensorboard.plugins.hparams import api as hp

        config = getattr(self.model, "config", None)
        if config is None:
            raise UserError("fit.HParams: the model has no madry_ns config; use it with "
                            "madry_ns.AdversarialTrainer")
        writer = tf.summary.create_file_writer(self.log_dir)
        with writer.as_default():
            hp.hparams(hparams_values(config))
        writer.flush()
        writer.close()


def _quiet(*args, **kwargs):
    del args, kwargs
