"""Models: Madry's WRN (parameter count, TF1 names, an independent numpy forward, BN mode
plumbing, initializers, checkpoint coverage) and ResNet-20."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from madry_ns import config as config_lib
from madry_ns.layers import BatchNorm
from madry_ns.models import MadryWRN, ResNet20, build_model

BN_VARS = ("beta", "gamma", "moving_mean", "moving_variance")


def madry_tf1_shapes(width: int) -> dict:
    """Madry's checkpoint variables and shapes (madry_reference.md section 3.3)."""
    f = [16, 16 * width, 32 * width, 64 * width]
    shapes = {"input/init_conv/DW": (3, 3, 3, 16)}
    for s in range(1, 4):
        for i in range(5):
            in_f, out_f = (f[s - 1] if i == 0 else f[s]), f[s]
            unit = f"unit_{s}_{i}"
            first = "shared_activation" if (s, i) == (1, 0) else "residual_only_activation"
            shapes.update({f"{unit}/{first}/BatchNorm/{v}": (in_f,) for v in BN_VARS})
            shapes[f"{unit}/sub1/conv1/DW"] = (3, 3, in_f, out_f)
            shapes.update({f"{unit}/sub2/BatchNorm/{v}": (out_f,) for v in BN_VARS})
            shapes[f"{unit}/sub2/conv2/DW"] = (3, 3, out_f, out_f)
    shapes.update({f"unit_last/BatchNorm/{v}": (f[3],) for v in BN_VARS})
    shapes["logit/DW"] = (f[3], 10)
    shapes["logit/biases"] = (10,)
    return shapes


@pytest.fixture(scope="module")
def wrn10():
    """Madry's full-width model, built once (46M parameters) from the default config."""
    keras.utils.set_random_seed(0)
    model = build_model(config_lib.from_dict({}))
    yield model
    del model
    keras.backend.clear_session()


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ----------------------------------------------------------------------------------------
# Madry's WRN at width 10


def test_default_config_builds_madry_wrn_34_10_with_45901914_parameters(wrn10):
    assert isinstance(wrn10, MadryWRN) and wrn10.width == 10
    assert _count(wrn10.trainable_variables) == 45_901_914
    # The spec's breakdown: 31 convs, 31 BN layers (gamma, beta), the dense layer.
    names = wrn10.tf1_variables()
    assert _count(v for n, v in names.items() if n.endswith("/DW") and "logit" not in n) \
        == 45_873_072
    assert _count(v for n, v in names.items() if n.endswith(("/gamma", "/beta"))) == 22_432
    assert _count(v for n, v in names.items() if n.endswith(("/moving_mean",
                                                             "/moving_variance"))) == 22_432
    assert _count([names["logit/DW"], names["logit/biases"]]) == 6_410


def test_decay_variables_are_exactly_the_31_conv_and_1_dense_kernels(wrn10):
    decay = wrn10.decay_variables()
    assert len(decay) == 32
    # Madry's rule: every trainable variable whose name contains 'DW'.
    madry = [v for n, v in wrn10.tf1_variables().items() if "DW" in n]
    assert {id(v) for v in decay} == {id(v) for v in madry}
    assert all(v.trainable and len(v.shape) in (2, 4) for v in decay)


def test_tf1_variables_have_madry_names_and_shapes(wrn10):
    names = wrn10.tf1_variables()
    assert {n: tuple(v.shape) for n, v in names.items()} == madry_tf1_shapes(10)
    # Spot checks copied from the spec's listing.
    assert tuple(names["unit_1_0/sub1/conv1/DW"].shape) == (3, 3, 16, 160)
    assert tuple(names["unit_2_0/sub1/conv1/DW"].shape) == (3, 3, 160, 320)
    assert tuple(names["unit_3_0/residual_only_activation/BatchNorm/gamma"].shape) == (320,)
    assert tuple(names["unit_last/BatchNorm/moving_variance"].shape) == (640,)
    # One name per variable, and every model variable has a name.
    assert len({id(v) for v in names.values()}) == len(names) == len(wrn10.variables)
    assert {id(v) for v in names.values()} == {id(v) for v in wrn10.variables}


def test_initializers_are_madrys(wrn10):
    names = wrn10.tf1_variables()
    for name, var in names.items():
        w = var.numpy().astype(np.float64)
        if name.endswith("/DW") and w.ndim == 4:
            # tf.random_normal_initializer(stddev=sqrt(2 / (k*k*out))), untruncated.
            std = np.sqrt(2.0 / (9 * w.shape[-1]))
            tolerance = 6 / np.sqrt(2 * w.size) + 0.01
            assert abs(w.std() / std - 1) < tolerance, name
            assert abs(w.mean()) < 6 * std / np.sqrt(w.size), name
        elif name.endswith(("/beta", "/moving_mean")) or name == "logit/biases":
            assert np.all(w == 0), name
        elif name.endswith(("/gamma", "/moving_variance")):
            assert np.all(w == 1), name
    # Untruncated: about 4.55% of a normal lies beyond 2 sigma (a truncated normal has none).
    big = names["unit_3_2/sub2/conv2/DW"].numpy()
    beyond = np.mean(np.abs(big) > 2 * np.sqrt(2.0 / (9 * 640)))
    assert 0.043 < beyond < 0.048
    # uniform_unit_scaling_initializer(1.0) = U(+-sqrt(3 / fan_in)), fan_in 640.
    dense = names["logit/DW"].numpy()
    bound = np.sqrt(3.0 / 640)
    assert np.abs(dense).max() <= bound and np.abs(dense).max() > 0.98 * bound
    assert abs(dense.std() / (bound / np.sqrt(3)) - 1) < 0.05


# ----------------------------------------------------------------------------------------
# An independent forward pass, written from Madry's model.py


def _np_conv(x, w, stride):
    """tf.nn.conv2d(..., padding='SAME'): extra padding goes bottom/right."""
    _, h, wd, _ = x.shape
    out_h, out_w = -(-h // stride), -(-wd // stride)
    pad_h = max((out_h - 1) * stride + 3 - h, 0)
    pad_w = max((out_w - 1) * stride + 3 - wd, 0)
    xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    patches = sliding_window_view(xp, (3, 3), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ijco->nhwo", patches, w)


def _np_lrelu(x):
    return np.where(x < 0.0, 0.1 * x, x)


def madry_forward_numpy(x, p, width, bn_statistics="population"):
    """Madry's Model('eval') forward in float64 numpy, from TF1-named parameters `p`.

    bn_statistics='batch' normalizes with the batch's own (biased) moments instead.
    """
    def bn(v, scope):
        if bn_statistics == "population":
            mean, var = p[f"{scope}/moving_mean"], p[f"{scope}/moving_variance"]
        else:
            mean, var = v.mean(axis=(0, 1, 2)), v.var(axis=(0, 1, 2))
        return p[f"{scope}/gamma"] * (v - mean) / np.sqrt(var + 1e-3) + p[f"{scope}/beta"]

    # tf.image.per_image_standardization
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True))
    x = (x - mean) / np.maximum(std, 1.0 / np.sqrt(x[0].size))
    x = _np_conv(x, p["input/init_conv/DW"], 1)
    filters = [16, 16 * width, 32 * width, 64 * width]
    strides = [1, 2, 2]
    for s in range(3):
        for i in range(5):
            unit = f"unit_{s + 1}_{i}"
            in_f = filters[s] if i == 0 else filters[s + 1]
            out_f = filters[s + 1]
            stride = strides[s] if i == 0 else 1
            if s == 0 and i == 0:  # activate_before_residual
                x = _np_lrelu(bn(x, f"{unit}/shared_activation/BatchNorm"))
                orig = x
            else:
                orig = x
                x = _np_lrelu(bn(x, f"{unit}/residual_only_activation/BatchNorm"))
            x = _np_conv(x, p[f"{unit}/sub1/conv1/DW"], stride)
            x = _np_lrelu(bn(x, f"{unit}/sub2/BatchNorm"))
            x = _np_conv(x, p[f"{unit}/sub2/conv2/DW"], 1)
            if in_f != out_f:
                n, h, w, c = orig.shape
                orig = orig.reshape(n, h // stride, stride, w // stride, stride, c).mean((2, 4))
                pad = (out_f - in_f) // 2
                orig = np.pad(orig, ((0, 0), (0, 0), (0, 0), (pad, pad)))
            x = x + orig
    x = _np_lrelu(bn(x, "unit_last/BatchNorm"))
    x = x.mean(axis=(1, 2))
    return x @ p["logit/DW"] + p["logit/biases"]


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.bn_layers():
        c = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                           rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
    model.logit.bias.assign(rng.normal(0, 0.1, 10))


def _images(n, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("width", [1, 2])
def test_forward_matches_independent_numpy_model(width):
    # Width 2 also exercises the zero-padded shortcut of unit_1_0 (16 -> 32 channels).
    keras.utils.set_random_seed(1)
    model = MadryWRN(width=width).build_for_input()
    _randomize_bn(model)
    params = {n: v.numpy().astype(np.float64) for n, v in model.tf1_variables().items()}
    x = _images(4)
    for mode, stats in [("population", "population"), ("batch_frozen", "batch")]:
        want = madry_forward_numpy(x.astype(np.float64), params, width, stats)
        got = model(tf.constant(x), bn_mode=mode).numpy()
        scale = np.abs(want).max()
        assert scale > 0.1
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale, err_msg=mode)


def test_per_image_standardization_makes_the_model_scale_invariant():
    keras.utils.set_random_seed(2)
    model = MadryWRN(width=1).build_for_input()
    x = _images(2)
    a = model(tf.constant(x), bn_mode="population").numpy()
    b = model(tf.constant(x / 255.0), bn_mode="population").numpy()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------
# BN mode plumbing, checkpoint coverage


def _moving(model):
    return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
            for layer in model.bn_layers()]


def test_bn_mode_reaches_every_bn_layer():
    keras.utils.set_random_seed(3)
    model = MadryWRN(width=1).build_for_input()
    assert len(model.bn_layers()) == 31
    assert all(isinstance(layer, BatchNorm) for layer in model.bn_layers())
    x = tf.constant(_images(4))
    initial = _moving(model)
    for kwargs, updates in [({"bn_mode": "batch_update"}, True), ({"training": True}, True),
                            ({"bn_mode": "population"}, False),
                            ({"bn_mode": "batch_frozen"}, False),
                            ({"training": False}, False), ({}, False)]:
        for layer, (m, v) in zip(model.bn_layers(), initial):
            layer.moving_mean.assign(m)
            layer.moving_variance.assign(v)
        model(x, **kwargs)
        for i, ((m0, v0), (m1, v1)) in enumerate(zip(initial, _moving(model))):
            changed = (not np.array_equal(m0, m1), not np.array_equal(v0, v1))
            assert changed == (updates, updates), (kwargs, i)


def test_checkpoint_holds_every_weight_and_bn_statistic(tmp_path):
    keras.utils.set_random_seed(4)
    model = MadryWRN(width=1).build_for_input()
    rng = np.random.default_rng(0)
    for v in model.variables:  # distinct values everywhere, moving statistics included
        v.assign(rng.normal(0, 1, v.shape).astype(np.float32) ** 2 + 0.1)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    stored = [name for name, _ in tf.train.list_variables(path)
              if name.startswith("model/") and "OPTIMIZER" not in name]
    assert len(stored) == len(model.variables) == 31 * 4 + 31 + 2

    keras.utils.set_random_seed(5)
    fresh = MadryWRN(width=1).build_for_input()
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    theirs = fresh.tf1_variables()
    for name, var in model.tf1_variables().items():
        np.testing.assert_array_equal(theirs[name].numpy(), var.numpy(), err_msg=name)


# ----------------------------------------------------------------------------------------
# ResNet-20


def resnet20_parameter_count(width: int) -> int:
    """By hand: 3x3 convs without bias, BN gamma+beta, dense with bias; option-A shortcuts
    (subsample + zero pad) have no parameters."""
    f = [16 * width, 32 * width, 64 * width]
    conv = lambda i, o: 9 * i * o  # noqa: E731
    total = conv(3, f[0]) + 2 * f[0]                 # stem conv + BN
    in_f = f[0]
    for out_f in f:
        for _ in range(3):
            total += conv(in_f, out_f) + 2 * out_f + conv(out_f, out_f) + 2 * out_f
            in_f = out_f
    return total + f[2] * 10 + 10


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_parameter_count(width):
    model = ResNet20(width=width).build_for_input()
    assert _count(model.trainable_variables) == resnet20_parameter_count(width)
    if width == 1:
        assert resnet20_parameter_count(1) == 269_722  # the "0.27M" of He et al.
    assert len(model.bn_layers()) == 19
    assert len(model.decay_variables()) == 20            # 19 convs + the dense kernel
    assert all(len(v.shape) in (2, 4) for v in model.decay_variables())


def test_resnet20_bn_modes_and_config():
    model = build_model(config_lib.from_dict({"model": "resnet20"}))
    assert isinstance(model, ResNet20) and model.width == 1
    x = tf.constant(_images(4))
    before = _moving(model)
    frozen = model(x, bn_mode="batch_frozen").numpy()
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(before, _moving(model)))
    assert frozen.shape == (4, 10)
    model(x, bn_mode="batch_update")
    assert all(not np.array_equal(a[0], b[0]) for a, b in zip(before, _moving(model)))


def test_build_model_width_override():
    model = build_model(config_lib.from_dict({"model_width": 1}))
    assert isinstance(model, MadryWRN) and model.width == 1
    assert _count(model.trainable_variables) == sum(
        int(np.prod(s)) for n, s in madry_tf1_shapes(1).items() if "moving" not in n)


# ----------------------------------------------------------------------------------------
# Every setting in the config; .keras files; other input shapes; fine-tuning's parts

from madry_ns import finetune, models  # noqa: E402

TINY_WIDTH = {"madry_wrn": 1, "resnet20": 1, "resnet18": 4, "wrn34": 1}
NOT_DEFAULT = dict(num_classes=5, input_shape=(20, 24, 1), norm_layer="rna",
                   rna_candidates=["bn", "ln"], rna_sampling="network", bn_epsilon=2e-4,
                   bn_momentum=0.8, synchronized=True, weight_decay_on="all",
                   input_normalization="channel", input_mean=[0.25], input_std=[0.5])


@pytest.mark.parametrize("name", sorted(models.MODEL_CLASSES))
def test_get_config_round_trips_every_setting(name):
    cls = models.MODEL_CLASSES[name]
    model = cls(width=TINY_WIDTH[name] + 1, **NOT_DEFAULT)
    config = model.get_config()
    for key, value in {"width": TINY_WIDTH[name] + 1, **NOT_DEFAULT}.items():
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    twin = cls.from_config(config)
    assert type(twin) is cls and twin.get_config() == config
    twin.build_for_input()
    model.build_for_input()
    assert [(v.path, v.shape) for v in twin.variables] == \
        [(v.path, v.shape) for v in model.variables]
    # The settings reach the layers: every batch norm, RNA's BN candidates included.
    bns = model.bn_layers()
    assert bns and all(bn.synchronized for bn in bns)
    assert all(layer.candidates == ("bn", "ln") for layer in model.rna_layers())
    if name in ("madry_wrn", "wrn34"):  # the final BN stays a BatchNorm with the model's own
        assert (model.final_bn.epsilon, model.final_bn.momentum) == (2e-4, 0.8)
    assert model.num_paths() == 2 and model.decay_variables() == model.trainable_variables
    # Defaults: each model's own BN epsilon, CIFAR-10's shape.
    plain = cls().get_config()
    assert plain["bn_epsilon"] == (1e-3 if name in ("madry_wrn", "resnet20") else 1e-5)
    assert (plain["input_shape"], plain["num_classes"]) == ([32, 32, 3], 10)
    assert plain["input_normalization"] == "per_image"
    # A config saved before the normalization settings existed (an older .keras file)
    # rebuilds with Madry's per-image standardization.
    old = {k: v for k, v in plain.items() if not k.startswith("input_") or k == "input_shape"}
    assert cls.from_config(old).get_config() == plain


INPUTS = np.random.default_rng(7).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def normalized_twins():
    """ResNet-20s at width 1 with the same weights, one per input normalization, and the
    first convolution's input captured per call."""
    built = {}
    for how in models.INPUT_NORMALIZATIONS:
        keras.utils.set_random_seed(5)
        built[how] = _randomized(models.ResNet20(
            width=1, input_shape=(16, 16, 3), input_normalization=how,
            input_mean=[0.5, 0.4, 0.3], input_std=[0.2, 0.25, 0.3]).build_for_input())
    return built


def test_input_normalizations_feed_the_network_what_they_say(normalized_twins):
    x = tf.constant(INPUTS)
    per_image = normalized_twins["per_image"].normalize_input(x).numpy()
    # Bit for bit the call the model made before the setting existed.
    np.testing.assert_array_equal(per_image, tf.image.per_image_standardization(x).numpy())
    np.testing.assert_array_equal(normalized_twins["none"].normalize_input(x).numpy(),
                                  (INPUTS / np.float32(255)).astype(np.float32))
    want = (INPUTS.astype(np.float64) / 255 - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.3]
    np.testing.assert_allclose(normalized_twins["channel"].normalize_input(x).numpy(), want,
                               rtol=1e-6, atol=1e-6)


def test_logits_are_the_forward_of_the_normalized_input(normalized_twins):
    x = tf.constant(INPUTS)
    per_image = normalized_twins["per_image"]
    for how, model in normalized_twins.items():
        got = model(x, bn_mode="population").numpy()
        # The same weights on the same normalized input: the normalization is all that differs.
        want = per_image.forward(model.normalize_input(x), "population").numpy()
        np.testing.assert_array_equal(got, want, err_msg=how)


def test_keras_file_keeps_the_input_normalization(tmp_path, normalized_twins):
    model = normalized_twins["channel"]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == model.get_config()
    x = tf.constant(INPUTS)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_channel_constants_must_match_the_channels():
    with pytest.raises(ValueError, match="one input_mean and one positive input_std per"):
        models.ResNet20(input_normalization="channel", input_mean=[0.5], input_std=[0.2])
    with pytest.raises(ValueError, match="input_normalization must be one of"):
        models.ResNet20(input_normalization="torch")
    config = config_lib.from_dict({"model": "resnet20", "input_normalization": "channel",
                                   "input_mean": [0.5], "input_std": [0.2]})
    from madry_ns.errors import ConfigError

    with pytest.raises(ConfigError, match="key 'input_mean' has value \\[0.5\\]"):
        build_model(config)


def test_build_model_passes_the_input_normalization():
    config = config_lib.from_dict({"model": "resnet20", "input_normalization": "channel",
                                   "input_mean": [0.1, 0.2, 0.3], "input_std": [1, 2, 3]})
    c = build_model(config).get_config()
    assert (c["input_normalization"], c["input_mean"], c["input_std"]) == \
        ("channel", [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert build_model(config_lib.from_dict(
        {"model": "resnet20"})).get_config()["input_normalization"] == "per_image"


def _randomized(model, seed=0):
    """Non-trivial weights and statistics, and a non-zero RNA path."""
    rng = np.random.default_rng(seed)
    for var in model.variables:
        if var.dtype == "int32":
            continue
        low = "variance" in var.path or "gamma" in var.path
        var.assign((rng.uniform(0.5, 1.5, var.shape) if low else
                    rng.normal(0, 0.3, var.shape)).astype(np.float32))
    if model.rna_layers():
        model.set_path([i % 2 for i in range(len(model.rna_layers()))])
    return model


@pytest.mark.parametrize("norm_layer", ["bn", "rna"])
@pytest.mark.parametrize("name", sorted(models.MODEL_CLASSES))
def test_keras_file_restores_the_logits_in_each_bn_mode(tmp_path, name, norm_layer):
    keras.utils.set_random_seed(0)
    cls = models.MODEL_CLASSES[name]
    model = _randomized(cls(width=TINY_WIDTH[name], norm_layer=norm_layer,
                            input_shape=(16, 16, 3)).build_for_input())
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is cls and loaded.get_config() == model.get_config()
    assert [p for p in loaded.path().numpy()] == [p for p in model.path().numpy()]
    x = tf.constant(np.random.default_rng(1).uniform(0, 255, (6, 16, 16, 3)), tf.float32)
    for mode in ("population", "batch_frozen"):
        np.testing.assert_array_equal(loaded(x, bn_mode=mode).numpy(),
                                      model(x, bn_mode=mode).numpy(), err_msg=mode)


@pytest.mark.parametrize("name", sorted(models.MODEL_CLASSES))
def test_another_input_shape_and_class_count_build_and_run(name):
    config = config_lib.from_dict({"model": name, "model_width": TINY_WIDTH[name]})
    model = build_model(config, input_shape=(28, 28, 1), num_classes=5)
    assert (model.image_shape, model.num_classes) == ((28, 28, 1), 5)
    assert model.first_conv().kernel.shape[2] == 1
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)), tf.float32)
    for mode in ("population", "batch_update", "batch_frozen"):
        assert model(x, bn_mode=mode).shape == (3, 5)


def test_build_model_passes_the_config_settings():
    config = config_lib.from_dict({"model": "resnet20", "norm_layer": "rna",
                                   "rna_candidates": ["bn", "gn_2"], "rna_sampling": "network",
                                   "weight_decay_variables": "all"})
    model = build_model(config)
    c = model.get_config()
    assert (c["norm_layer"], c["rna_candidates"], c["rna_sampling"], c["weight_decay_on"],
            c["synchronized"]) == ("rna", ["bn", "gn_2"], "network", "all", False)
    synced = build_model(config.replace(bn_sync="synchronized", distribution="mirrored"))
    assert synced.get_config()["synchronized"] and all(bn.synchronized
                                                       for bn in synced.bn_layers())


@pytest.mark.parametrize("name", sorted(models.MODEL_CLASSES))
def test_fine_tuning_parts_are_the_first_conv_and_the_logit_layer(name):
    model = models.MODEL_CLASSES[name](width=TINY_WIDTH[name]).build_for_input()
    assert model.first_conv() is model.init_conv and model.logit_layer() is model.logit
    config = config_lib.from_dict({"model": name, "trainable": "bn+logits+conv1"})
    chosen = {id(v) for v in finetune.trainable_variables(model, config)}
    bn = {id(v) for b in model.bn_layers() for v in (b.gamma, b.beta)}
    # As before the methods: the BN affine parameters, init_conv's kernel and the logits.
    assert chosen == bn | {id(model.init_conv.kernel), id(model.logit.kernel),
                           id(model.logit.bias)}


def test_load_model_reads_keras_files(tmp_path):
    import madry_ns

    model = _randomized(models.ResNet20(width=1, input_shape=(16, 16, 3)).build_for_input())
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = madry_ns.load_model(path)
    x = tf.constant(np.random.default_rng(2).uniform(0, 255, (4, 16, 16, 3)), tf.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    with pytest.raises(madry_ns.checkpoints.CheckpointError, match="does not exist"):
        madry_ns.load_model(str(tmp_path / "missing.keras"))


_LOAD_AFTER_IMPORT_MADRY_NS = """
import sys
import numpy as np
import madry_ns
assert "tensorflow" not in sys.modules and "madry_ns.models" not in sys.modules, "not light"
import keras
model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2], allow_pickle=False)
np.save(sys.argv[3], np.stack([model(x, bn_mode=m).numpy()
                               for m in ("population", "batch_frozen")]))
"""


def test_keras_load_model_needs_only_import_madry_ns(tmp_path):
    """A fresh interpreter that imports nothing of the toolkit but the package (which stays
    free of TensorFlow) restores a toolkit `.keras` file with Keras' own `load_model`."""
    import os
    import subprocess
    import sys

    model = _randomized(models.ResNet20(width=1, norm_layer="rna", input_shape=(8, 8, 3))
                        .build_for_input())
    model.save(str(tmp_path / "m.keras"))
    x = np.random.default_rng(3).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", _LOAD_AFTER_IMPORT_MADRY_NS,
                             str(tmp_path / "m.keras"), str(tmp_path / "x.npy"),
                             str(tmp_path / "logits.npy")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npy", allow_pickle=False)
    for got, mode in zip(logits, ("population", "batch_frozen")):
        np.testing.assert_array_equal(got, model(x, bn_mode=mode).numpy(), err_msg=mode)


def test_exported_saved_model_serves_the_population_forward(tmp_path):
    """`model.export(path)` (Keras' SavedModel export, for TF Serving, TFLite, ...) serves
    `model(x)`: BN with population statistics (RNA: the model's current path)."""
    model = _randomized(models.ResNet20(width=1, input_shape=(8, 8, 3)).build_for_input())
    model.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    x = tf.constant(np.random.default_rng(4).uniform(0, 255, (4, 8, 8, 3)), tf.float32)
    expected = model(x, bn_mode="population").numpy()
    # The random weights make logits of order 1e9; the exported graph may fuse and order the
    # float32 sums differently from eager, so the error is judged against the logits' scale
    # per image (an AMD EPYC host differed by 3e-5 of one small logit, 2e-7 of its row's largest).
    logits = served.serve(x).numpy()
    error = np.abs(logits - expected).max(axis=1)
    assert (error <= 1e-5 * np.abs(expected).max(axis=1)).all(), error
    assert not np.allclose(logits, model(x, bn_mode="batch_frozen").numpy())
