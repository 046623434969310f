"""`madry_ns.AdversarialTrainer`: train.py's step through Keras' `fit`.

Equal to train.py (bit for bit: both run `training.TrainStep`), every regime, Keras callbacks,
BackupAndRestore resuming mid-run, MirroredStrategy (in a subprocess, see
tests/fit_runner.py), plain Keras classifiers and what they refuse. Models are ResNet-20 at
width 1 on 8x8 random images unless train.py's data is needed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import madry_ns
from madry_ns import checkpoints, fit, models, rna, seeds, training
from madry_ns import config as config_lib
from madry_ns.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 3)
BATCH = 8
# Small and fast: PGD-1, batch 8, a learning-rate drop after step 1, weight decay on.
FAST = dict(training_batch_size=BATCH, num_steps=1, epsilon=16.0, step_size=16.0,
            step_size_schedule=[[0, 0.1], [1, 0.05]], weight_decay=0.01)


def _config(**overrides):
    return config_lib.from_dict({"model": "resnet20", "model_width": 1, **FAST, **overrides})


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *SHAPE)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int64))


def _batches(n_batches, seed=0):
    """The same `n_batches` full batches, in the same order, every epoch."""
    x, y = _images(n_batches * BATCH, seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)


def _model(config, seed=0):
    keras.utils.set_random_seed(seed)
    return models.build_model(config, input_shape=SHAPE, num_classes=10)


def _trainer(config, seed=0):
    trainer = madry_ns.AdversarialTrainer(_model(config, seed), config)
    trainer.compile()
    return trainer


def _state(trainer):
    return [v.numpy().copy() for v in trainer.classifier.variables] + \
        [v.numpy().copy() for v in trainer.optimizer.variables]


def _set_state(trainer, state):
    for var, value in zip(list(trainer.classifier.variables) + list(trainer.optimizer.variables),
                          state):
        var.assign(value)


def _assert_equal_states(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(u, v, err_msg=f"variable {i}")


# ----------------------------------------------------------------------------------------
# Settings


def test_settings_are_config_keys_by_name_or_a_config_and_are_validated():
    config = _config(training_method="trades")
    assert fit.resolve_config(config) is config
    assert fit.resolve_config(config, trades_beta=1.0) == config.replace(trades_beta=1.0)
    assert fit.resolve_config({"epsilon": 4}, num_steps=3) == config_lib.from_dict(
        {"epsilon": 4, "num_steps": 3})
    assert fit.resolve_config() == config_lib.from_dict({})
    with pytest.raises(ConfigError, match="unknown key 'epsilom'.*did you mean 'epsilon'"):
        fit.resolve_config(epsilom=8)
    with pytest.raises(ConfigError, match="expected a madry_ns.config.Config"):
        fit.resolve_config("config.json")


# ----------------------------------------------------------------------------------------
# Equal to train.py


def test_fit_drives_train_step_as_run_loop_does():
    """Fast variant of the next test (a plain Keras model, so no train.py): three steps through
    fit equal three `TrainStep` calls with run_loop's step index, bit for bit (tolerance 0),
    across a learning-rate drop, with weight decay and a random-start PGD whose seeds come
    from the step (the optimizer's iteration count in fit)."""
    config = fit.resolve_config(**FAST)
    trainer = madry_ns.AdversarialTrainer(_plain(), config)
    trainer.compile()
    twin = madry_ns.AdversarialTrainer(_plain(), config)  # the model interface for TrainStep
    optimizer = training.make_optimizer(config)
    optimizer.build(twin.classifier.trainable_variables)
    step = training.TrainStep(twin._net, optimizer, config)
    for i, (x, y) in enumerate(_batches(3)):
        step(x, y, tf.constant(i, tf.int64))
    trainer.fit(_batches(3), epochs=1, verbose=0)
    _assert_equal_states([v.numpy() for v in twin.classifier.variables] +
                         [v.numpy() for v in optimizer.variables], _state(trainer))


@pytest.mark.slow
@pytest.mark.extended
def test_fit_equals_train_py_after_three_steps(tmp_path):
    """Extended (not run by default or in CI; the test above is its fast variant).
    train.py's data (digits, its order and augmentation), seeds, TF1 momentum across a
    learning-rate drop, weight decay, a PGD attack whose steps update the BN statistics
    (`batch_update`, the default) and the per-image standardization inside the model: after
    3 steps the weights, BN statistics, momentum slots and step count are bit-identical
    (tolerance 0: both run `training.TrainStep`'s compiled functions on the same inputs)."""
    config = config_lib.from_dict({
        "model_dir": str(tmp_path / "train"), "dataset": "digits", "model": "resnet20",
        "model_width": 1, "augmentation": "madry", "max_num_training_steps": 3,
        "num_checkpoint_steps": 100, "num_output_steps": 100, "num_summary_steps": 100,
        **FAST, "num_steps": 2, "step_size": 8.0})
    final = training.train(config, out=lambda *a: None)

    keras.utils.set_random_seed(config.tf_random_seed)  # train.py's seed_everything
    trainer = madry_ns.AdversarialTrainer(models.build_model(config), config)
    trainer.compile()
    history = trainer.fit(fit.training_data(config), steps_per_epoch=3, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "adv_accuracy", "xent"}
    assert history.history["loss"][0] > 0

    # train.py's final checkpoint, read back with its own Checkpointer: model and optimizer.
    reference = models.build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(reference.trainable_variables)
    restored = checkpoints.Checkpointer(config.model_dir, reference, optimizer).restore_latest()
    assert restored == final
    _assert_equal_states([v.numpy() for v in reference.variables],
                         [v.numpy() for v in trainer.classifier.variables])
    assert int(trainer.optimizer.iterations.numpy()) == 3
    _assert_equal_states([v.numpy() for v in optimizer.variables],
                         [v.numpy() for v in trainer.optimizer.variables])


# ----------------------------------------------------------------------------------------
# Regimes (each one step; the slow test below checks every regime against TrainStep)


@pytest.mark.slow
@pytest.mark.extended
def test_bn_affine_fit_updates_only_gamma_and_beta_and_keeps_the_statistics():
    """Extended (not run by default or in CI)."""
    config = _config(trainable="bn_affine", train_attack_bn_mode="population")
    trainer = _trainer(config)
    model = trainer.classifier
    affine = {id(v) for bn in model.bn_layers() for v in (bn.gamma, bn.beta)}
    before = {id(v): v.numpy().copy() for v in model.variables}
    trainer.fit(_batches(1), epochs=1, verbose=0)
    for v in model.variables:
        changed = not np.array_equal(before[id(v)], v.numpy())
        assert changed == (id(v) in affine), v.path
    assert len(trainer.optimizer.accumulators) == len(affine)


@pytest.mark.slow
@pytest.mark.extended
def test_rna_fit_updates_on_the_path_drawn_after_the_attack():
    """Extended (not run by default or in CI)."""
    config = _config(norm_layer="rna", model="resnet20")
    trainer = _trainer(config)
    model = trainer.classifier
    assert model.rna_layers()
    trainer.fit(_batches(1), epochs=1, verbose=0)
    want = model.sample_path(rna.fold(seeds.training(config, 0), rna.TRAIN_PATH_STREAM))
    np.testing.assert_array_equal(model.path().numpy(), want.numpy())


# ----------------------------------------------------------------------------------------
# Callbacks and BackupAndRestore (one trainer: Madry PGD with shaping, restored between runs)


def _hparams(log_dir):
    """The hyperparameters of the hparams plugin's session-start summary in `log_dir`."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for name in os.listdir(log_dir):
        if not name.startswith("events."):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                content = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content)
                if content.HasField("session_start_info"):
                    return {k: getattr(v, v.WhichOneof("kind")) for k, v in
                            content.session_start_info.hparams.items()}
    return None


class _Interrupt(keras.callbacks.Callback):
    """Raises after `after` training steps (the process dying mid-run)."""

    def __init__(self, after):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def shaping_trainer():
    trainer = _trainer(_config(shaping_ratio=3))
    return trainer, _state(trainer)


def test_backup_and_restore_resumes_mid_run_equal_to_an_uninterrupted_fit(
        shaping_trainer, tmp_path):
    """Two epochs of two steps: straight, then interrupted after step 3 (inside epoch 2) and
    resumed. Keras backs up at the end of epoch 1 and resumes at epoch 2 with the model and
    optimizer (step count included, which the attack's seeds derive from). Before resuming,
    every variable is scrambled: the resumed state comes from the backup alone."""
    trainer, initial = shaping_trainer
    _set_state(trainer, initial)
    trainer.fit(_batches(2), epochs=2, verbose=0)
    straight = _state(trainer)
    assert int(trainer.optimizer.iterations.numpy()) == 4

    _set_state(trainer, initial)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(_batches(2), epochs=2, verbose=0, callbacks=[backup, _Interrupt(3)])
    assert int(trainer.optimizer.iterations.numpy()) == 3
    _set_state(trainer, [np.full_like(v, 7) for v in initial])
    history = trainer.fit(_batches(2), epochs=2, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert len(history.history["loss"]) == 1  # only epoch 2 ran
    _assert_equal_states(_state(trainer), straight)


def test_keras_callbacks_see_the_training_logs(shaping_trainer, tmp_path):
    trainer, initial = shaping_trainer
    _set_state(trainer, initial)
    trainer._initial_epoch = None  # Keras keeps the epoch a BackupAndRestore resumed at
    callbacks = [keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                 fit.HParams(str(tmp_path / "tb")),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras")),
                 keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
                 keras.callbacks.EarlyStopping(monitor="loss", patience=0, mode="max")]
    history = trainer.fit(_batches(1), epochs=4, verbose=0, callbacks=callbacks)
    # The loss falls, so "stop when it stops rising" ends training after epoch 2.
    assert len(history.history["loss"]) == 2
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"loss", "adv_accuracy", "xent"} <= set(rows[0])
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.history["loss"])
    assert os.listdir(tmp_path / "tb" / "train")
    assert _hparams(tmp_path / "tb") == fit.hparams_values(trainer.config)
    # ModelCheckpoint saved the trained classifier, which Keras loads back as it was.
    restored = keras.saving.load_model(str(tmp_path / "epoch2.keras"))
    x, _ = _images(BATCH, seed=5)
    np.testing.assert_array_equal(restored(x).numpy(), trainer.classifier(x).numpy())


@pytest.mark.slow
@pytest.mark.extended
def test_the_docstring_example_runs(tmp_path, monkeypatch):
    """Extended (not run by default or in CI): madry_ns.fit's example, as written."""
    lines = []
    for line in fit.__doc__.split("::\n\n", 1)[1].splitlines():
        if line and not line.startswith("    "):
            break  # the end of the indented block
        lines.append(line[4:])
    assert any("trainer.fit(" in line for line in lines)
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(lines), "example", "exec"), {})
    restored = keras.saving.load_model(str(tmp_path / "model.keras"))
    assert isinstance(restored, models.ResNet20)


# ----------------------------------------------------------------------------------------
# Plain Keras classifiers


def _plain(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(SHAPE), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(2, 3, padding="same"), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(10)])


@pytest.mark.parametrize("method", ["madry", "trades"])
def test_plain_keras_classifier_trains_with_madry_pgd_and_trades(method):
    net = _plain()
    bn = net.layers[2]
    trainer = madry_ns.AdversarialTrainer(net, training_method=method, **FAST)
    assert trainer.config.train_attack_bn_mode == "batch_update"  # the default: Keras' own
    # compile's loss and metrics serve evaluate (and validation): clean, population forward.
    trainer.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    before = [v.numpy().copy() for v in net.variables]
    history = trainer.fit(_batches(2), epochs=1, verbose=0, validation_data=_batches(1, 3))
    assert np.isfinite(history.history["loss"][0]) and history.history["loss"][0] > 0
    assert set(history.history) == {"loss", "adv_accuracy", "xent", "val_loss", "val_accuracy"}
    x_val, y_val = _images(BATCH, 3)
    logits = net(x_val, training=False)
    assert trainer.evaluate(_batches(1, 3), verbose=0, return_dict=True) == pytest.approx({
        "loss": float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            y_val, logits)),
        "accuracy": float(np.mean(np.argmax(logits, 1) == y_val))}, rel=1e-5)
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(before, net.variables))
    # The attack's forwards (training=True) updated the moving averages, as Madry's did.
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)
    assert int(trainer.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("key, value", [
    ("train_attack_bn_mode", "batch_frozen"), ("shaping_ratio", 3),
    ("trainable", "bn_affine"), ("norm_layer", "rna")])
def test_plain_keras_refuses_what_needs_the_toolkits_bn_modes(key, value):
    extra = {"train_attack_bn_mode": "population"} if key == "trainable" else {}
    with pytest.raises(ConfigError, match=f"key '{key}' has value {value!r}, which a plain "
                                          f"Keras model cannot train with: .*"):
        madry_ns.AdversarialTrainer(_plain(), **FAST, **extra, **{key: value})


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_a_non_finite_loss_stops_or_skips_without_touching_the_weights(on_nonfinite):
    trainer = madry_ns.AdversarialTrainer(_plain(), **FAST, on_nonfinite=on_nonfinite)
    trainer.compile()
    before = _state(trainer)
    x, y = _images(BATCH)
    x[0, 0, 0, 0] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    if on_nonfinite == "stop":
        with pytest.raises(training.TrainingStopped, match="non-finite loss or gradient at "
                                                           "step 0.*not applied"):
            trainer.fit(data, epochs=1, verbose=0)
        # Parameters and optimizer as before; the BN statistics the step's forwards changed
        # are not put back (train.py's "stop" ends the run without saving them).
        trainable = {id(v) for v in trainer.classifier.trainable_variables}
        kept = [i for i, v in enumerate(list(trainer.classifier.variables)
                                        + list(trainer.optimizer.variables))
                if id(v) in trainable or i >= len(trainer.classifier.variables)]
        _assert_equal_states([_state(trainer)[i] for i in kept], [before[i] for i in kept])
    else:
        with pytest.warns(RuntimeWarning, match="step 0: non-finite.*batch skipped"):
            trainer.fit(data, epochs=1, verbose=0)
        after = _state(trainer)
        assert int(trainer.optimizer.iterations.numpy()) == 1  # the step still counts
        iterations = [i for i, v in enumerate(trainer.optimizer.variables)
                      if v is trainer.optimizer.iterations]
        _assert_equal_states([v for i, v in enumerate(after)
                              if i - len(trainer.classifier.variables) not in iterations],
                             [v for i, v in enumerate(before)
                              if i - len(trainer.classifier.variables) not in iterations])


def test_a_batch_of_the_wrong_size_is_a_clear_error():
    trainer = madry_ns.AdversarialTrainer(_plain(), **FAST)
    trainer.compile()
    x, y = _images(BATCH + 3)
    with pytest.raises(ConfigError, match=r"a batch of 11 rows, but training_batch_size is 8"):
        trainer.fit(x, y, batch_size=BATCH + 3, verbose=0)


# ----------------------------------------------------------------------------------------
# MirroredStrategy


def _run_mirrored(tmp_path, scenario):
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "-1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fit_runner.py"),
                           scenario, str(tmp_path), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fit_runs_under_mirrored_strategy(tmp_path):
    """Two logical CPUs (set before TensorFlow starts, so in a fresh process): a plain Keras
    classifier trains 2 Madry PGD steps under a MirroredStrategy scope, each replica on its
    half of the batch, and the replicas hold the same weights and BN statistics after."""
    result = _run_mirrored(tmp_path, "plain")
    assert result["replicas"] == 2
    assert result["steps"] == 2 and result["loss"] > 0
    assert result["weights_changed"] and result["replicas_agree"]


@pytest.mark.slow
@pytest.mark.extended
def test_fit_under_mirrored_strategy_equals_train_py_under_it(tmp_path):
    """Extended (not run by default or in CI; the test above is its fast variant). train.py
    with `distribution: mirrored` and fit under a MirroredStrategy scope, both with shaping
    (each replica keeps the n:1 mix) and per-replica BN statistics (averaged at the end),
    give the same weights, bit for bit."""
    result = _run_mirrored(tmp_path, "train_py")
    assert result["replicas"] == 2
    assert result["max_difference"] == 0.0
    assert result["replicas_agree"]


# ----------------------------------------------------------------------------------------
# Every regime equals TrainStep (slow, extended)

REGIMES = {
    "madry": {}, "madry_cw": {"loss_func": "cw"},
    "madry_batch_frozen_attack": {"train_attack_bn_mode": "batch_frozen"},
    "trades": {"training_method": "trades"}, "natural": {"training_method": "natural"},
    "shaping": {"shaping_ratio": 3},
    "shaping_attacked_loss": {"shaping_ratio": 3, "shaping_attack_loss": "attacked"},
    "shaping_train_only": {"shaping_ratio": 3, "shaping_mode": "train_only"},
    "shaping_trades_ce": {"shaping_ratio": 3, "training_method": "trades"},
    "shaping_trades_trades": {"shaping_ratio": 3, "training_method": "trades",
                              "shaping_trades_update": "trades"},
    "bn_stats": {"trainable": "bn_stats"},
    "bn_affine": {"trainable": "bn_affine", "train_attack_bn_mode": "population"},
    "bn": {"trainable": "bn"}, "bn_logits_conv1": {"trainable": "bn+logits+conv1"},
    "rna_resample": {"norm_layer": "rna"},
    "rna_same": {"norm_layer": "rna", "rna_train_path": "same"},
}


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_every_regime_through_fit_equals_train_step(regime):
    """Extended (not run by default or in CI): for every training method, shaping mode,
    BN-only regime and RNA path rule, two steps through fit equal two `TrainStep` calls on
    a copy of the model, bit for bit."""
    config = _config(**REGIMES[regime])
    trainer = _trainer(config)
    twin = _model(config)
    optimizer = training.make_optimizer(config)
    from madry_ns import finetune

    optimizer.build(finetune.trainable_variables(twin, config))
    step = training.TrainStep(twin, optimizer, config)
    for i, (x, y) in enumerate(_batches(2)):
        step(x, y, tf.constant(i, tf.int64))
    trainer.fit(_batches(2), epochs=1, verbose=0)
    _assert_equal_states([v.numpy() for v in twin.variables],
                         [v.numpy() for v in trainer.classifier.variables])
