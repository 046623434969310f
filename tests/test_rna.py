"""Random Normalization Aggregation: the layer against numpy, the path API (no retrace, only
the active candidate runs and updates statistics, the path space), checkpoints, training
(paths per step, resume) and the evaluation protocols."""

from __future__ import annotations

import itertools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import (attacks, checkpoints, data, evaluation, models, rna, rna_eval,
                      seeds)
from madry_ns import config as config_lib
from madry_ns import training
from madry_ns.errors import ConfigError
from madry_ns.layers import BatchNorm, RandomNorm

EPS = 1e-5
IMAGE = 8  # toy models see 8x8 images: fast, and every code path is the same


class Toy(models._Classifier):
    """Three conv + RNA + ReLU layers, global pooling, dense: a path space small enough to
    enumerate."""

    def __init__(self, candidates=("bn", "in"), num_layers: int = 3, width: int = 4,
                 **kwargs):
        super().__init__(**kwargs)
        norm = models.norm_factory("rna", candidates)
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"conv{i}", keras.layers.Conv2D(width, 3, padding="same",
                                                          use_bias=False, name=f"conv{i}"))
            setattr(self, f"norm{i}", norm(f"norm{i}"))
        self.logit = keras.layers.Dense(10, name="logit")

    def forward(self, x, bn_mode):
        for i in range(self.num_layers):
            x = tf.nn.relu(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x),
                                                     mode=bn_mode))
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))

    def build_for_input(self):
        self(tf.zeros([1, IMAGE, IMAGE, 3]), bn_mode="population")
        return self


def _toy(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return Toy(**kwargs).build_for_input()


def _images(n=6, seed=1, size=IMAGE):
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)),
                       tf.float32)


def _labels(n=6, seed=2):
    return tf.constant(np.random.default_rng(seed).integers(0, 10, n), tf.int64)


def _randomize(model, seed=3):
    """Non-trivial values in every float variable (moving variances positive)."""
    rng = np.random.default_rng(seed)
    for var in model.variables:
        if var.dtype == "int32":
            continue
        value = rng.uniform(0.5, 1.5, var.shape) if "variance" in var.path or "gamma" in \
            var.path else rng.normal(0, 0.5, var.shape)
        var.assign(value.astype(np.float32))


def _config(**overrides):
    return config_lib.from_dict({"norm_layer": "rna", **overrides}, source="test")


# ----------------------------------------------------------------------------------------
# The layer against an independent numpy computation (PyTorch's formulas)


def _numpy_group_norm(x, groups, gamma, beta):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)  # biased, as torch.nn.GroupNorm
    return ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape) * gamma + beta


@pytest.mark.parametrize("name,groups", [("in", 6), ("ln", 1), ("gn_2", 2), ("gn_3", 3)])
def test_group_type_candidates_match_numpy(name, groups):
    x = np.random.default_rng(0).normal(2, 3, (4, 5, 5, 6)).astype(np.float32)
    layer = RandomNorm(["bn", name])
    layer.build(x.shape)
    gamma = np.linspace(0.5, 1.5, 6).astype(np.float32)
    beta = np.linspace(-1, 1, 6).astype(np.float32)
    layer.candidate(name).set_weights([gamma, beta])
    layer.choice.assign(1)
    want = _numpy_group_norm(x, groups, gamma, beta)
    for mode in ("population", "batch_update", "batch_frozen"):  # no statistics to pick
        np.testing.assert_allclose(layer(x, mode=mode).numpy(), want, rtol=1e-4, atol=1e-4)


def test_bn_candidate_is_pytorch_batchnorm2d_in_keras_terms():
    layer = RandomNorm()
    layer.build((2, 3, 3, 4))
    bn = layer.candidate("bn")
    assert isinstance(bn, BatchNorm) and bn.momentum == 0.9 and bn.epsilon == EPS
    assert layer.candidate("in").groups == 4 and layer.candidate("in").epsilon == EPS  # C groups
    x = np.random.default_rng(0).normal(1, 2, (2, 3, 3, 4)).astype(np.float32)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    out = layer(x, mode="batch_update").numpy()
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-4)
    # PyTorch momentum 0.1: running = 0.9 running + 0.1 batch.
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)


def test_each_candidate_has_its_own_parameters_and_only_bn_has_statistics():
    layer = RandomNorm(["bn", "in", "ln", "gn_2"])
    layer.build((1, 2, 2, 4))
    paths = [w.path for w in layer.weights]
    assert paths[0].endswith("/choice")
    for name in ["bn", "in", "ln", "gn_2"]:
        assert f"{layer.name}/norm_{name}/gamma" in paths
        assert f"{layer.name}/norm_{name}/beta" in paths
    assert [p for p in paths if "moving" in p] == [f"{layer.name}/norm_bn/moving_mean",
                                                  f"{layer.name}/norm_bn/moving_variance"]
    assert len(layer.trainable_weights) == 8 and layer.choice.dtype == "int32"
    assert not layer.choice.trainable


@pytest.mark.parametrize("candidates", [[], ["bn", "bn"], ["bn", "gn_0"], ["bn", "xn"]])
def test_invalid_candidates_are_refused(candidates):
    with pytest.raises(ValueError):
        RandomNorm(candidates)
    with pytest.raises(ConfigError, match="rna_candidates"):
        _config(rna_candidates=candidates)


def test_group_count_that_does_not_divide_the_channels_is_a_config_error():
    config = _config(model="resnet18", model_width=2, rna_candidates=["bn", "gn_3"])
    with pytest.raises(ConfigError, match="gn_3.*divide by 3"):
        models.build_model(config)


# ----------------------------------------------------------------------------------------
# Paths: resampling without retracing, only the active candidate, determinism


def test_resample_changes_the_active_candidates_without_a_retrace():
    model = _toy(num_layers=3)
    x = _images()
    traces = []

    @tf.function
    def resample_and_forward(x, seed):
        traces.append(1)
        model.resample(seed)
        return model(x, bn_mode="population"), model.path()

    seen = {}
    for s in range(12):
        logits, path = resample_and_forward(x, tf.constant([7, s], tf.int64))
        seen[tuple(path.numpy())] = logits.numpy()
        np.testing.assert_array_equal(model.path().numpy(), path.numpy())
        np.testing.assert_array_equal(path.numpy(), model.sample_path([7, s]).numpy())
    assert len(traces) == 1
    assert len(seen) > 3  # several paths drawn, each with its own output
    outputs = list(seen.values())
    assert all(not np.allclose(a, b) for a, b in itertools.combinations(outputs, 2))


def test_training_step_resamples_twice_inside_one_trace():
    model = _toy()
    config = _config(training_batch_size=6, num_steps=2, step_size=4.0)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, config)
    x, y = _images(), _labels()
    for s in range(4):
        step(x, y, tf.constant(s, tf.int64))
        seed = rna.training_seed(config, s)
        np.testing.assert_array_equal(
            model.path().numpy(),
            model.sample_path(rna.fold(seed, rna.TRAIN_PATH_STREAM)).numpy())
    assert step._compute.experimental_get_tracing_count() == 1


def _stats(model):
    return [(layer.candidate("bn").moving_mean.numpy().copy(),
             layer.candidate("bn").moving_variance.numpy().copy())
            for layer in model.rna_layers()]


@pytest.mark.parametrize("train_path", ["resample", "same"])
def test_only_the_active_bn_candidates_update_statistics_in_a_training_step(train_path):
    model = _toy(num_layers=3)
    config = _config(training_batch_size=6, num_steps=2, step_size=4.0,
                     rna_train_path=train_path)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, config)
    x, y = _images(), _labels()
    for s in range(6):
        seed = rna.training_seed(config, s)
        attacked = model.sample_path(rna.fold(seed, rna.ATTACK_PATH_STREAM)).numpy()
        trained = attacked if train_path == "same" else \
            model.sample_path(rna.fold(seed, rna.TRAIN_PATH_STREAM)).numpy()
        before = _stats(model)
        step(x, y, tf.constant(s, tf.int64))
        after = _stats(model)
        np.testing.assert_array_equal(model.path().numpy(), trained)
        for layer, (b, a) in enumerate(zip(before, after)):
            # BN index 0: its statistics move iff the attack or the update ran through it.
            used = attacked[layer] == 0 or trained[layer] == 0
            changed = not (np.array_equal(b[0], a[0]) and np.array_equal(b[1], a[1]))
            assert changed == used, (s, layer, attacked, trained)


def test_inactive_bn_is_not_even_run_in_batch_update():
    layer = RandomNorm()
    x = tf.constant(np.random.default_rng(0).normal(3, 2, (4, 3, 3, 2)), tf.float32)
    layer.build(x.shape)
    layer.choice.assign(1)
    bn = layer.candidate("bn")

    @tf.function
    def call(x):
        return layer(x, mode="batch_update")

    call(x)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(2))
    layer.choice.assign(0)
    call(x)  # same trace, now through BN
    assert np.all(bn.moving_mean.numpy() != 0)
    assert call.experimental_get_tracing_count() == 1


def test_a_fixed_path_gives_deterministic_outputs_eager_and_compiled():
    model = _toy()
    _randomize(model)
    x = _images()
    model.set_path(["in", "bn", "in"])
    assert model.path_names() == ["in", "bn", "in"]
    first = model(x, bn_mode="population").numpy()
    compiled = tf.function(lambda x: model(x, bn_mode="population"))
    for _ in range(3):
        np.testing.assert_array_equal(model(x, bn_mode="population").numpy(), first)
        np.testing.assert_allclose(compiled(x).numpy(), first, rtol=1e-5, atol=1e-5)
    model.set_path("bn")
    assert not np.allclose(model(x, bn_mode="population").numpy(), first)
    model.set_path(tf.constant([1, 0, 1]))
    np.testing.assert_array_equal(model(x, bn_mode="population").numpy(), first)


def test_set_path_refuses_wrong_lengths_names_and_ranges():
    model = _toy()
    with pytest.raises(ValueError, match="3 choices"):
        model.set_path(["bn", "in"])
    with pytest.raises(ValueError, match="not a candidate"):
        model.set_path(["bn", "ln", "in"])
    with pytest.raises(ValueError, match="out of range"):
        model.set_path([0, 1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.set_path(tf.constant([0, 1, 2]))


# ----------------------------------------------------------------------------------------
# The path space


def test_number_of_distinct_paths_is_candidates_to_the_layers():
    candidates = ("bn", "in", "ln")
    model = _toy(candidates=candidates, num_layers=3)
    _randomize(model)
    assert model.num_paths() == 3 ** 3 and model.num_paths("network") == 3
    x = _images()
    outputs = {}
    for path in itertools.product(range(3), repeat=3):
        model.set_path(list(path))
        outputs[path] = model(x, bn_mode="population").numpy()
    assert len(outputs) == 27
    for a, b in itertools.combinations(outputs, 2):
        assert not np.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)
    # Sampling reaches every one of them, and nothing else.
    drawn = {tuple(model.sample_path([0, s]).numpy()) for s in range(600)}
    assert drawn == set(outputs)
    network = {tuple(model.sample_path([0, s], "network").numpy()) for s in range(60)}
    assert network == {(0, 0, 0), (1, 1, 1), (2, 2, 2)}


def test_per_layer_sampling_is_uniform_and_independent_across_layers():
    model = _toy(num_layers=3)
    paths = np.stack([model.sample_path([1, s]).numpy() for s in range(4000)])
    assert abs(paths.mean() - 0.5) < 0.02
    np.testing.assert_allclose(paths.mean(axis=0), 0.5, atol=0.03)
    corr = np.corrcoef(paths.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.05)
    joint = np.unique(paths, axis=0, return_counts=True)[1] / len(paths)
    np.testing.assert_allclose(joint, 1 / 8, atol=0.02)


def test_released_architectures_have_the_released_rna_layers():
    def build(model, width, **kw):
        keras.utils.set_random_seed(0)
        return models.build_model(_config(model=model, model_width=width, **kw))

    r18 = build("resnet18", 2)
    names = [layer.name for layer in r18.rna_layers()]
    # Forward order: the stem, then per block bn1, bn2 and the shortcut's norm: 20 layers.
    assert len(names) == 20 and r18.num_paths() == 2 ** 20
    assert names[:8] == ["init_bn", "bn1", "bn2", "bn1", "bn2", "bn1", "bn2", "shortcut_bn"]
    assert names.count("shortcut_bn") == 3
    wrn = build("wrn34", 1)
    assert len(wrn.rna_layers()) == 30 and isinstance(wrn.final_bn, BatchNorm)
    assert not isinstance(wrn.final_bn, RandomNorm)
    madry = build("madry_wrn", 1)
    assert len(madry.rna_layers()) == 30 and isinstance(madry.final_bn, BatchNorm)
    with pytest.raises(ValueError, match="BatchNorm only"):
        madry.tf1_variables()
    assert len(build("resnet20", 1).rna_layers()) == 19


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_resnet18_has_the_released_parameter_count_and_rna_doubles_the_norm_affines():
    keras.utils.set_random_seed(0)
    bn = models.build_model(_config(model="resnet18", norm_layer="bn"))
    # PyTorch's CIFAR ResNet-18 (kuangliu layout, the RNA code's): 11,173,962.
    assert _count(bn.trainable_variables) == 11_173_962
    norm_channels = sum(int(layer.gamma.shape[0]) for layer in bn.bn_layers())
    rna_model = models.build_model(_config(model="resnet18"))
    assert _count(rna_model.trainable_variables) == 11_173_962 + 2 * norm_channels
    assert len(rna_model.rna_layers()) == 20


@pytest.mark.slow
def test_wrn34_10_has_the_released_parameter_count():
    keras.utils.set_random_seed(0)
    model = models.build_model(_config(model="wrn34", norm_layer="bn"))
    assert _count(model.trainable_variables) == 46_160_474  # TRADES' WRN-34-10


def test_torch_conv_pads_symmetrically_like_pytorch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    conv = models.TorchConv2D(4, 3, 2)
    conv.build(x.shape)
    kernel = conv.kernel.numpy()
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    want = np.zeros((2, 4, 4, 4), np.float32)
    for i in range(4):
        for j in range(4):
            window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            want[:, i, j, :] = np.einsum("bhwc,hwco->bo", window, kernel)
    np.testing.assert_allclose(conv(x).numpy(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Checkpoints


def _local(var):
    """A variable's path inside its model ('norm0/norm_bn/gamma')."""
    return var.path.split("/", 1)[1]


def test_checkpoints_round_trip_every_candidate_statistics_and_the_choices(tmp_path):
    model = _toy(candidates=("bn", "in", "gn_2"))
    _randomize(model)
    model.set_path([2, 0, 1])
    saved = {_local(v): v.numpy().copy() for v in model.variables}
    prefix = checkpoints.Checkpointer(str(tmp_path), model, training.make_optimizer(
        _config())).save(5)
    fresh = _toy(seed=9, candidates=("bn", "in", "gn_2"))
    assert fresh.path().numpy().tolist() == [0, 0, 0]
    checkpoints.load_weights(fresh, prefix)
    restored = {_local(v): v.numpy() for v in fresh.variables}
    assert sorted(restored) == sorted(saved)
    assert sum("choice" in p for p in saved) == 3
    assert sum("moving" in p for p in saved) == 6
    assert sum("/gamma" in p for p in saved) == 9
    for path, value in saved.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)
    assert fresh.path().numpy().tolist() == [2, 0, 1]


def test_a_checkpoint_from_other_candidates_is_refused(tmp_path):
    model = _toy(candidates=("bn", "in"))
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ck"))
    other = _toy(candidates=("bn", "ln"))
    with pytest.raises(checkpoints.CheckpointError, match="norm_ln"):
        checkpoints.load_weights(other, prefix)


# ----------------------------------------------------------------------------------------
# Attacks on a fixed path


def _fixed_path_forward(model):
    return lambda z, seed=None: model(z, bn_mode="population")


def test_eot_pgd_with_one_sample_on_a_fixed_path_equals_pgd():
    model = _toy()
    _randomize(model)
    model.set_path(["in", "bn", "bn"])
    x, y = _images(), _labels()
    params = dict(epsilon=8.0, num_steps=4, step_size=2.0, random_start=True)
    seed = tf.constant([3, 4], tf.int64)
    plain = attacks.pgd_attack(model, x, y, bn_mode="population", seed=seed, **params)
    forward = _fixed_path_forward(model)
    eot = attacks.eot_pgd(lambda z, s: tf.reduce_sum(attacks.xent_loss(forward(z, s), y)), x,
                          eot_samples=1, seed=seed, **params)
    np.testing.assert_array_equal(eot.numpy(), plain.numpy())
    assert np.abs(eot.numpy() - x.numpy()).max() > 0


@pytest.mark.parametrize("loss", ["xent", "dlr"])
def test_apgd_with_eot_on_a_fixed_path_equals_apgd(loss):
    model = _toy()
    _randomize(model)
    model.set_path(["bn", "in", "in"])
    x, y = _images(), _labels()
    forward = _fixed_path_forward(model)
    kwargs = dict(epsilon=8.0, num_steps=6, loss=loss, seed=tf.constant([1, 2], tf.int64))
    plain = attacks.apgd(forward, x, y, **kwargs)
    for k in (1, 3):  # identical draws: the mean gradient is the gradient
        eot = attacks.apgd(forward, x, y, eot_samples=k, **kwargs)
        np.testing.assert_allclose(eot.numpy(), plain.numpy(), rtol=0, atol=1e-3)


def test_eot_averages_over_paths_and_each_draw_selects_its_own_path():
    model = _toy()
    _randomize(model)
    x, y = _images(), _labels()
    drawn = []

    def loss_fn(z, seed):
        drawn.append(seed)
        return tf.reduce_sum(attacks.xent_loss(rna.forward_on_path(model, "population")(z,
                                                                                         seed), y))

    # The gradient of one step of EOT is the mean of per-path gradients; draw k of step 0
    # uses fold_in(fold_in(seed, 0), k) with int32 data, as eot_pgd.
    fold_in = tf.random.experimental.stateless_fold_in
    step0 = fold_in(tf.constant([5, 6], tf.int64), tf.constant(0))
    seeds = [fold_in(step0, tf.constant(k)) for k in range(4)]
    grads = []
    for s in seeds:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(x, s)
        grads.append(tape.gradient(loss, x))
    mean = tf.add_n(grads) / 4.0
    paths = {tuple(model.sample_path(s).numpy()) for s in seeds}
    assert len(paths) > 1
    x1 = attacks.eot_pgd(loss_fn, x, epsilon=8.0, num_steps=1, step_size=2.0, eot_samples=4,
                         random_start=False, seed=tf.constant([5, 6], tf.int64))
    want = np.clip(x.numpy() + 2.0 * np.sign(mean.numpy()), 0, 255)
    np.testing.assert_allclose(x1.numpy(), want, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Training: train.py's loop with RNA, resume


def _train_config(tmp_path, name, **overrides):
    values = dict(model_dir=str(tmp_path / name), dataset="digits", norm_layer="rna",
                  training_batch_size=8, max_num_training_steps=4, num_output_steps=2,
                  num_summary_steps=2, num_checkpoint_steps=2, num_steps=2, step_size=8.0,
                  epsilon=16.0, step_size_schedule=[[0, 0.1], [2, 0.01]],
                  weight_decay_variables="all", weight_decay=5e-4)
    values.update(overrides)
    return config_lib.from_dict(values, source="test")


@pytest.fixture
def toy_builds(monkeypatch):
    """train() builds the toy model (seeded by train itself) at 32x32."""
    def build(config):
        model = Toy(candidates=tuple(config.rna_candidates))
        model.rna_sampling = config.rna_sampling
        model.weight_decay_on = config.weight_decay_variables
        model(tf.zeros([1, 32, 32, 3]), bn_mode="population")
        return model

    monkeypatch.setattr(training, "build_model", build)


def _read(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith("save_counter") and k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_rna_training_resumed_equals_uninterrupted(tmp_path, toy_builds):
    full = _train_config(tmp_path, "full")
    final = training.train(full, out=lambda line: None)
    first = _train_config(tmp_path, "split", max_num_training_steps=2)
    training.train(first, out=lambda line: None)
    lines = []
    resumed = training.train(_train_config(tmp_path, "split"), out=lines.append)
    assert lines[0].startswith("Resuming from") and lines[0].endswith("at step 2")
    a, b = _read(final), _read(resumed)
    assert sorted(a) == sorted(b)
    assert sum("choice" in k for k in a) == 3
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Weight decay on all parameters reaches every candidate, active or not (as PyTorch 1.x,
    # whose zero_grad left zero gradients on the unselected ones).
    start, end = Toy(), Toy()
    for model, prefix in ((start, os.path.join(full.model_dir, "checkpoint-2")),
                          (end, final)):
        model(tf.zeros([1, 32, 32, 3]))
        checkpoints.load_weights(model, prefix)
    for a_layer, b_layer in zip(start.rna_layers(), end.rna_layers()):
        for name in ("bn", "in"):
            assert not np.array_equal(a_layer.candidate(name).gamma.numpy(),
                                      b_layer.candidate(name).gamma.numpy())


def test_weight_decay_on_all_variables_covers_every_trainable_variable():
    model = _toy()
    assert len(model.decay_variables()) == 4  # three conv kernels and the dense kernel
    model.weight_decay_on = "all"
    assert [v.path for v in model.decay_variables()] == \
        [v.path for v in model.trainable_variables]
    want = sum(float(np.sum(v.numpy() ** 2)) / 2 for v in model.trainable_variables)
    assert float(training.weight_decay_loss(model)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------
# Evaluation: eval.py's labels and paths, and the four protocols


def _dataset(n=12, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    return data.Dataset(images, labels, images, labels, [str(i) for i in range(10)], "test")


def _eval_config(**overrides):
    return _config(**{"num_eval_examples": 12, "eval_batch_size": 6, "num_steps": 3,
                      "epsilon": 16.0, "step_size": 8.0, **overrides})


def test_eval_classifier_draws_a_fresh_path_per_call_and_the_attacker_its_own():
    model = _toy()
    config = _eval_config()
    classify = evaluation.make_classifier(model, config, _dataset())
    x = _images()
    for n in range(3):
        logits = classify(x)
        want = model.sample_path([config.inference_seed, n])
        np.testing.assert_array_equal(model.path().numpy(), want.numpy())
        model.set_path(want)
        np.testing.assert_allclose(logits.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    labels = evaluation.describe(config)
    assert "paper's protocol" in labels["attack"] and "fresh random path" in labels["inference"]
    assert "rna_eval" in labels["attack"]


def test_eval_classifier_with_a_fixed_path_attacks_and_classifies_on_it():
    model = _toy()
    config = _eval_config(rna_inference_path="fixed")
    classify = evaluation.make_classifier(model, config, _dataset())
    attack = evaluation.make_eval_attack(model, config, classify)
    x, y = _images(), _labels()
    fixed = model.sample_path([config.inference_seed, 0]).numpy()
    x_adv = attack(x, y, 0)
    np.testing.assert_array_equal(model.path().numpy(), fixed)
    want = attacks.pgd_attack(model, x, y, bn_mode="population",
                              seed=tf.constant([config.np_random_seed, 0], tf.int64),
                              **{k: v for k, v in attacks.config_params(config).items()})
    np.testing.assert_allclose(x_adv.numpy(), want.numpy(), atol=1e-3)
    classify(x_adv)
    np.testing.assert_array_equal(model.path().numpy(), fixed)
    assert "white-box on one path" in evaluation.describe(config)["attack"]


def test_spread_statistics_by_hand():
    correct = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 1]], bool)
    pred = np.array([[3, 1, 2, 0], [3, 7, 5, 1], [3, 1, 2, 1]])
    s = rna_eval.spread(correct, pred)
    assert s["accuracy"] == pytest.approx(np.mean([0.5, 0.5, 0.75]))
    assert s["accuracy_std"] == pytest.approx(np.std([0.5, 0.5, 0.75]))
    assert (s["accuracy_min"], s["accuracy_max"]) == (0.5, 0.75)
    assert s["correct_on_all_paths"] == 0.25 and s["correct_on_any_path"] == 0.75
    # Modal shares per example: 3/3, 2/3, 2/3, 2/3.
    assert s["agreement"] == pytest.approx((1 + 2 / 3 * 3) / 4)
    assert s["unanimous"] == 0.25


@pytest.fixture(scope="module")
def protocol_results():
    keras.utils.set_random_seed(0)
    model = Toy()
    model(tf.zeros([1, 32, 32, 3]), bn_mode="population")
    _randomize(model)
    config = _eval_config()
    settings = rna_eval.Settings(repeats=4, eot_samples=2, apgd_steps=4)
    first = rna_eval.evaluate(model, _dataset(), config, settings)
    again = rna_eval.evaluate(model, _dataset(), config, settings)
    return model, config, first, again


def test_rna_eval_reports_all_four_protocols_labelled_and_repeats_itself(protocol_results):
    _, _, result, again = protocol_results
    assert json.dumps(result["results"]) == json.dumps(again["results"])
    names = ["clean", "paper", "fixed", "eot", "aa_eot"]
    assert list(result["results"]) == names
    for name in names:
        entry = result["results"][name]
        assert entry["generation"] and entry["classification"] and entry["protocol"]
        assert 0 <= entry["accuracy_min"] <= entry["accuracy"] <= entry["accuracy_max"] <= 1
        assert entry["correct_on_all_paths"] <= entry["accuracy"] <= \
            entry["correct_on_any_path"]
    assert result["results"]["paper"]["repeats"] == 4
    assert result["results"]["fixed"]["repeats"] == 1
    assert "transfer between paths" in result["results"]["paper"]["classification"]
    assert "over 2 random paths" in result["results"]["eot"]["generation"]
    aa = result["results"]["aa_eot"]
    assert aa["accuracy"] <= min(aa["apgd-ce"]["accuracy"], aa["apgd-dlr"]["accuracy"],
                                 result["results"]["clean"]["accuracy"]) + 1e-9
    assert "8 paths" in result["paths"]
    table = rna_eval.table(result, "toy")
    assert table.count("\n| toy |") == 5


def test_fixed_protocol_classifies_on_the_attacked_path(protocol_results):
    model, config, result, _ = protocol_results
    # Recompute by hand: per batch, PGD on the attack path, classified on that path.
    dataset = _dataset()
    base = tf.constant([config.inference_seed, 0], tf.int64)
    correct = []
    for i in range(2):
        x = tf.constant(dataset.test_images[6 * i:6 * i + 6], tf.float32)
        y = tf.constant(dataset.test_labels[6 * i:6 * i + 6])
        model.resample(rna.fold(base, seeds.STREAMS["rna_attack_path_eval"], i))
        x_adv = attacks.pgd_attack(model, x, y, bn_mode="population",
                                   seed=rna.fold(base, seeds.STREAMS["rna_start"], i),
                                   **attacks.config_params(config))
        correct.append(np.mean(np.argmax(model(x_adv).numpy(), 1) == y.numpy()))
    assert result["results"]["fixed"]["accuracy"] == pytest.approx(np.mean(correct))


def test_rna_eval_stopped_after_a_batch_resumes_and_equals_an_uninterrupted_run(
        protocol_results):
    """A run stopped after its second of three batches, continued from the `Partial` it
    saved, runs only the third batch and gives the uninterrupted run's numbers."""
    model, _, _, _ = protocol_results
    config = _eval_config(eval_batch_size=4)
    settings = rna_eval.Settings(repeats=3, eot_samples=2, apgd_steps=3)
    whole = rna_eval.evaluate(model, _dataset(), config, settings)
    saved, ran = [], []

    class Stop(Exception):
        pass

    def stop_after_two(i, n):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        rna_eval.evaluate(model, _dataset(), config, settings, on_batch=stop_after_two,
                          save=saved.append)
    partial = saved[-1]
    assert partial.batches == 2 and partial.y.shape == (8,)
    assert partial.preds["paper"].shape == (3, 8) and partial.preds["fixed"].shape == (1, 8)
    resumed = rna_eval.evaluate(model, _dataset(), config, settings, resume=partial,
                                on_batch=lambda i, n: ran.append(i))
    assert ran == [2]
    assert json.dumps(resumed["results"]) == json.dumps(whole["results"])
    assert resumed["seconds"].keys() == whole["seconds"].keys()
    # Other weights under the same checkpoint name: refused, not mixed into one table.
    wrong = rna_eval.Partial(2, partial.y, {**partial.preds,
                                            "clean": 9 - partial.preds["clean"]}, {})
    with pytest.raises(ConfigError, match="clean predictions differ"):
        rna_eval.evaluate(model, _dataset(), config, settings, resume=wrong)


def _rewrite_option():
    return tf.config.optimizer.get_experimental_options().get("arithmetic_optimization")


def test_rna_eval_turns_the_arithmetic_rewrite_off_while_it_runs(protocol_results):
    """The tensorflow#23780 workaround (`suite.arithmetic_rewrite_off`): off while a model is
    evaluated, the random-path one and the deterministic one alike, as it was after."""
    model, config, _, _ = protocol_results
    settings = rna_eval.Settings(protocols=("paper",), repeats=1)
    before, during = _rewrite_option(), []
    rna_eval.evaluate(model, _dataset(), config, settings,
                      on_batch=lambda i, n: during.append(_rewrite_option()))
    assert before in (None, True) and during == [False, False]
    assert _rewrite_option() in (None, True)
    keras.utils.set_random_seed(0)
    plain = models.ResNet20(width=1)
    plain.build_for_input()
    during.clear()
    rna_eval.evaluate(plain, _dataset(), _eval_config(norm_layer="bn"), settings,
                      on_batch=lambda i, n: during.append(_rewrite_option()))
    assert during == [False, False] and _rewrite_option() in (None, True)


def test_rna_eval_partial_file_round_trips_and_refuses_another_experiment(tmp_path):
    config = _eval_config()
    settings = rna_eval.Settings(repeats=3)
    run = rna_eval.identity(config, "m/checkpoint-9", "test", settings)
    partial = rna_eval.Partial(1, np.arange(6), {"clean": np.ones((3, 6), np.int64)},
                               {"paper+fixed": 1.5})
    where = rna_eval.partial_path(str(tmp_path / "rna_eval.jsonl"))
    rna_eval._save_partial(where, run, partial, 7.0)
    loaded, elapsed = rna_eval._load_partial(where, run)
    assert (loaded.batches, loaded.seconds, elapsed) == (1, {"paper+fixed": 1.5}, 7.0)
    np.testing.assert_array_equal(loaded.y, partial.y)
    np.testing.assert_array_equal(loaded.preds["clean"], partial.preds["clean"])
    other = rna_eval.identity(config, "m/checkpoint-9", "test", rna_eval.Settings(repeats=4))
    with pytest.raises(ConfigError, match=r"made with settings .*this run"):
        rna_eval._load_partial(where, other)
    with open(where, "wb") as f:
        f.write(b"not an npz")
    with pytest.raises(ConfigError, match="cannot read .*partial.npz"):
        rna_eval._load_partial(where, run)


def test_rna_eval_of_a_checkpoint_keeps_the_per_image_predictions_behind_its_numbers(
        tmp_path, toy_builds, monkeypatch):
    """evaluate_checkpoint leaves each finished run's predictions in the file its record
    names (the first line's in e.1.npz, the second's in e.2.npz) and no partial file; the
    outcomes `correct_by_protocol` makes of them are the record's accuracies; a run resumed
    after its last batch was saved runs nothing and keeps the same predictions."""
    from madry_ns import challenge
    monkeypatch.setattr(challenge, "build_model", training.build_model)
    config = _train_config(tmp_path, "m", num_eval_examples=12, eval_batch_size=6)
    training.train(config, out=lambda line: None)
    settings = rna_eval.Settings(repeats=3, eot_samples=2, apgd_steps=3)
    output = str(tmp_path / "e.jsonl")
    record = rna_eval.evaluate_checkpoint(config, settings=settings, output=output,
                                          out=lambda line: None)
    assert record["per_image"] == "e.1.npz"
    assert not os.path.exists(rna_eval.partial_path(output))
    y, preds = rna_eval.load_per_image(str(tmp_path / "e.1.npz"))
    correct = rna_eval.correct_by_protocol(y, preds)
    assert y.shape == (12,) and preds["paper"].shape == (3, 12)
    for name, entry in record["results"].items():
        assert entry["accuracy"] == pytest.approx(correct[name].mean()), name
    assert rna_eval.evaluate_checkpoint(config, settings=settings, output=output,
                                        out=lambda line: None)["per_image"] == "e.2.npz"
    # Stopped after saving its last batch, before its line: --resume only writes it.
    other = str(tmp_path / "f.jsonl")
    with open(tmp_path / "e.1.npz", "rb") as f, open(rna_eval.partial_path(other), "wb") as g:
        g.write(f.read())
    lines = []
    again = rna_eval.evaluate_checkpoint(config, settings=settings, output=other,
                                         out=lines.append, resume=True)
    assert lines[0].startswith("--resume: 2 test batches from")
    assert again["resumed_batches"] == 2 and again["results"] == record["results"]
    _, kept = rna_eval.load_per_image(str(tmp_path / "f.1.npz"))
    assert {k: v.tolist() for k, v in kept.items()} == {k: v.tolist() for k, v in preds.items()}
    with open(tmp_path / "f.1.npz", "wb") as f:
        f.write(b"not an npz")
    with pytest.raises(ConfigError, match="cannot read the per-image predictions .*f.1.npz"):
        rna_eval.load_per_image(str(tmp_path / "f.1.npz"))


def test_a_deterministic_model_makes_every_protocol_white_box_without_spread():
    keras.utils.set_random_seed(0)
    model = models.ResNet20(width=1)
    model.build_for_input()
    config = _eval_config(norm_layer="bn")
    settings = rna_eval.Settings(protocols=("paper", "fixed", "eot"), repeats=5,
                                 eot_samples=7)
    result = rna_eval.evaluate(model, _dataset(), config, settings)
    r = result["results"]
    assert result["paths"].startswith("deterministic")
    assert r["paper"]["accuracy"] == r["fixed"]["accuracy"] == r["eot"]["accuracy"]
    assert r["clean"]["repeats"] == 1 and r["clean"]["agreement"] == 1.0
    assert result["settings"]["eot_samples"] == 1
    assert "over 1 random paths" in r["eot"]["generation"]


def test_settings_refuse_unknown_protocols_and_non_positive_counts():
    with pytest.raises(ConfigError, match="protocols"):
        rna_eval.Settings(protocols=("paper", "pgd"))
    with pytest.raises(ConfigError, match="repeats"):
        rna_eval.Settings(repeats=0)


# ----------------------------------------------------------------------------------------
# Configs and data


def test_rna_config_consistency_checks():
    with pytest.raises(ConfigError, match="shaped"):
        _config(inference_bn="shaped")
    with pytest.raises(ConfigError, match="eval_attack_bn"):
        _config(inference_bn="batch", eval_attack_bn="population")
    _config(inference_bn="batch")


def test_pad4_flip_crops_40x40_windows_with_all_nine_offsets_and_flips():
    rng = np.random.default_rng(0)
    images = rng.uniform(1, 255, (512, 32, 32, 1)).astype(np.float32)
    out = data.augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64),
                             "pad4_flip").numpy()
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    offsets, flips = set(), 0
    for image, result in zip(padded, out):
        found = [(r, c, f) for r in range(9) for c in range(9) for f in (False, True)
                 if np.array_equal(result, (lambda w: w[:, ::-1] if f else w)(
                     image[r:r + 32, c:c + 32]))]
        assert len(found) == 1
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) == 81 and 200 < flips < 312


# ----------------------------------------------------------------------------------------
# The scripts: train.py, eval.py and rna_eval.py on the digits config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "rna", "digits_resnet18.json")


def _script(args, cwd):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_rna_eval_script_refuses_an_unknown_protocol_without_a_traceback(tmp_path):
    result = _script([os.path.join(ROOT, "rna_eval.py"), "--config", DIGITS,
                      "--protocols", "paper,pgd"], tmp_path)
    assert result.returncode == 2
    assert "error: --protocols paper,pgd" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.extended
def test_digits_config_trains_and_rna_eval_reports_the_protocols(tmp_path):
    sets = ["--set", f"model_dir={tmp_path / 'model'}", "--set", "max_num_training_steps=4",
            "--set", "model_width=2", "--set", "num_eval_examples=20",
            "--set", "eval_batch_size=10", "--set", "num_steps=2"]
    trained = _script([os.path.join(ROOT, "train.py"), "--config", DIGITS] + sets, tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = _script([os.path.join(ROOT, "eval.py"), "--config", DIGITS, "--once"] + sets,
                        tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "the paper's protocol, a transfer between paths" in evaluated.stdout
    result = _script([os.path.join(ROOT, "rna_eval.py"), "--config", DIGITS, "--repeats", "3",
                      "--eot_samples", "2", "--apgd_steps", "3"] + sets, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("| resnet18 |") == 5
    [record] = [json.loads(line) for line in open(tmp_path / "model" / "eval" /
                                                   "rna_eval.jsonl")]
    assert record["step"] == 4 and record["settings"]["repeats"] == 3
    assert list(record["results"]) == ["clean", "paper", "fixed", "eot", "aa_eot"]
    assert not os.path.exists(tmp_path / "model" / "eval" / "rna_eval.jsonl.partial.npz")
    again = _script([os.path.join(ROOT, "rna_eval.py"), "--config", DIGITS, "--repeats", "3",
                     "--eot_samples", "2", "--apgd_steps", "3", "--resume"] + sets, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already holds this evaluation" in again.stdout
