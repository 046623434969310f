"""BatchNorm's three modes against Keras' own BatchNormalization and against numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns.layers import BN_MODES, BatchNorm

EPS, MOMENTUM = 1e-3, 0.9


def _weights(channels, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 1.5, channels).astype(np.float32),   # gamma
            rng.normal(0, 0.5, channels).astype(np.float32),      # beta
            rng.normal(0, 1.0, channels).astype(np.float32),      # moving_mean
            rng.uniform(0.5, 2.0, channels).astype(np.float32)]   # moving_variance


def _pair(shape, seed=0, **kwargs):
    """Our BatchNorm and Keras' BatchNormalization with identical non-trivial weights."""
    ours = BatchNorm(**kwargs)
    ref = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS)
    ours.build(shape)
    ref.build(shape)
    w = _weights(shape[-1], seed)
    ours.set_weights(w)
    ref.set_weights(w)
    return ours, ref


def _input(shape, seed=1):
    rng = np.random.default_rng(seed)
    # Per-channel offsets and scales, so batch and moving statistics clearly differ.
    x = rng.normal(0, 1, shape) * rng.uniform(0.5, 3, shape[-1]) + rng.normal(0, 2, shape[-1])
    return tf.constant(x, tf.float32)


def _numpy_bn(x, gamma, beta, mean, var):
    return gamma * (x - mean) / np.sqrt(var + EPS) + beta


def _batch_moments(x):
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)  # biased variance, as Keras


def _stats(layer):
    return [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()]


SHAPES = [(8, 5, 5, 4), (16, 6)]  # 4-D takes the fused kernel, 2-D the unfused path


def test_defaults_are_madry():
    layer = BatchNorm()
    assert layer.momentum == MOMENTUM and layer.epsilon == EPS
    assert layer.center and layer.scale


@pytest.mark.parametrize("shape", SHAPES)
def test_population_matches_keras_inference_and_numpy(shape):
    ours, ref = _pair(shape)
    x = _input(shape)
    gamma, beta, mean, var = _weights(shape[-1])
    y = ours(x, mode="population").numpy()
    np.testing.assert_allclose(y, ref(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, _numpy_bn(x.numpy().astype(np.float64), gamma, beta, mean,
                                            var), rtol=1e-5, atol=1e-5)
    for a, b in zip(_stats(ours), [mean, var]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_update_matches_keras_training_and_numpy(shape):
    ours, ref = _pair(shape)
    x = _input(shape)
    gamma, beta, mean0, var0 = _weights(shape[-1])
    xn = x.numpy().astype(np.float64)
    bmean, bvar = _batch_moments(xn)

    y = ours(x, mode="batch_update").numpy()
    np.testing.assert_allclose(y, ref(x, training=True).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, _numpy_bn(xn, gamma, beta, bmean, bvar), rtol=1e-4,
                               atol=1e-4)
    # moving = 0.9 moving + 0.1 batch statistic, with the biased batch variance.
    np.testing.assert_allclose(ours.moving_mean.numpy(), MOMENTUM * mean0 + 0.1 * bmean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), MOMENTUM * var0 + 0.1 * bvar,
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(_stats(ours), _stats(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_frozen_uses_batch_statistics_and_leaves_moving_stats_untouched(shape):
    ours, ref = _pair(shape)
    x = _input(shape)
    gamma, beta, _, _ = _weights(shape[-1])
    before = _stats(ours)
    y = ours(x, mode="batch_frozen").numpy()
    bmean, bvar = _batch_moments(x.numpy().astype(np.float64))
    np.testing.assert_allclose(y, _numpy_bn(x.numpy().astype(np.float64), gamma, beta, bmean,
                                            bvar), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, ref(x, training=True).numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(_stats(ours), before):
        np.testing.assert_array_equal(a, b)  # bit-identical


def _grads(layer, x, call, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(call(layer, x) * upstream)
    return tape.gradient(loss, [x, layer.gamma, layer.beta])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["batch_update", "batch_frozen"])
def test_batch_mode_gradients_match_keras_training(shape, mode):
    ours, ref = _pair(shape)
    x = _input(shape)
    upstream = _input(shape, seed=5)
    g_ours = _grads(ours, x, lambda layer, v: layer(v, mode=mode), upstream)
    g_ref = _grads(ref, x, lambda layer, v: layer(v, training=True), upstream)
    for a, b, name in zip(g_ours, g_ref, ["x", "gamma", "beta"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_population_gradients_match_keras_inference(shape):
    ours, ref = _pair(shape)
    x = _input(shape)
    upstream = _input(shape, seed=5)
    g_ours = _grads(ours, x, lambda layer, v: layer(v, mode="population"), upstream)
    g_ref = _grads(ref, x, lambda layer, v: layer(v, training=False), upstream)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    # Inference BN is per-element affine: dy/dx = gamma / sqrt(var + eps).
    gamma, _, _, var = _weights(shape[-1])
    np.testing.assert_allclose(g_ours[0].numpy(),
                               upstream.numpy() * gamma / np.sqrt(var + EPS), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", BN_MODES)
def test_cross_sample_gradient_only_in_batch_modes(shape, mode):
    ours, _ = _pair(shape)
    x = _input(shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ours(x, mode=mode)
        out_1 = tf.reduce_sum(y[1] * _input(shape, seed=9)[1])
    grad_0 = tape.gradient(out_1, x)[0].numpy()  # how sample 0 moves sample 1's output
    if mode == "population":
        assert np.all(grad_0 == 0.0)
    else:
        assert np.abs(grad_0).max() > 1e-3


def test_folded_reproduces_population_output():
    shape = (4, 3, 3, 6)
    ours, _ = _pair(shape)
    x = _input(shape)
    m, b = ours.folded()
    np.testing.assert_allclose((x * m + b).numpy(), ours(x, mode="population").numpy(),
                               rtol=1e-5, atol=1e-5)
    gamma, beta, mean, var = _weights(6)
    np.testing.assert_allclose(m.numpy(), gamma / np.sqrt(var + EPS), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), beta - gamma / np.sqrt(var + EPS) * mean,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", BN_MODES)
def test_synchronized_unfused_path_equals_fused_on_one_device(mode):
    shape = (8, 4, 4, 5)
    fused, _ = _pair(shape)
    synced, _ = _pair(shape, synchronized=True)
    x = _input(shape)
    upstream = _input(shape, seed=4)
    g_fused = _grads(fused, x, lambda layer, v: layer(v, mode=mode), upstream)
    g_synced = _grads(synced, x, lambda layer, v: layer(v, mode=mode), upstream)
    for a, b in zip(g_fused, g_synced):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fused(x, mode=mode).numpy(), synced(x, mode=mode).numpy(),
                               rtol=1e-4, atol=1e-4)
    for a, b in zip(_stats(fused), _stats(synced)):  # two calls each by now
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_keyword_follows_keras():
    shape = (8, 3, 3, 4)
    x = _input(shape)
    reference, _ = _pair(shape)
    y_update = reference(x, mode="batch_update").numpy()
    stats_update = _stats(reference)

    layer, _ = _pair(shape)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), y_update)
    for a, b in zip(_stats(layer), stats_update):
        np.testing.assert_array_equal(a, b)

    for training in (False, None):
        layer, _ = _pair(shape)
        before = _stats(layer)
        np.testing.assert_array_equal(layer(x, training=training).numpy(),
                                      layer(x, mode="population").numpy())
        for a, b in zip(_stats(layer), before):
            np.testing.assert_array_equal(a, b)

    # A frozen layer (trainable=False) runs in inference mode even with training=True, as
    # Keras' BatchNormalization does; an explicit mode still wins.
    layer, ref = _pair(shape)
    layer.trainable = ref.trainable = False
    before = _stats(layer)
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, ref(x, training=True).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, layer(x, mode="population").numpy())
    for a, b in zip(_stats(layer), before):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(layer(x, mode="batch_frozen").numpy(), y, atol=1e-2)


def test_unknown_mode_is_a_value_error():
    layer, _ = _pair((2, 3))
    with pytest.raises(ValueError, match="'train'"):
        layer(tf.ones((2, 3)), mode="train")


class _NumpyBN:
    """The expected output and moving statistics of a sequence of calls."""

    def __init__(self, weights):
        self.gamma, self.beta, self.mean, self.var = [w.astype(np.float64) for w in weights]

    def __call__(self, x, mode):
        if mode == "population":
            return _numpy_bn(x, self.gamma, self.beta, self.mean, self.var)
        bmean, bvar = _batch_moments(x)
        if mode == "batch_update":
            self.mean = MOMENTUM * self.mean + (1 - MOMENTUM) * bmean
            self.var = MOMENTUM * self.var + (1 - MOMENTUM) * bvar
        return _numpy_bn(x, self.gamma, self.beta, bmean, bvar)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mode_switches_between_calls_of_one_compiled_function(jit_compile):
    shape = (8, 4, 4, 3)
    layer, _ = _pair(shape)
    expected = _NumpyBN(_weights(3))
    traces = []

    @tf.function(jit_compile=jit_compile)
    def run(x, mode):
        traces.append(mode)  # Python side effect: runs once per trace
        return layer(x, mode=mode)

    sequence = ["population", "batch_update", "batch_frozen", "population", "batch_update",
                "batch_update", "batch_frozen", "population"]
    for i, mode in enumerate(sequence):
        x = _input(shape, seed=10 + i)
        y = run(x, mode).numpy()
        want = expected(x.numpy().astype(np.float64), mode)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=f"call {i}: {mode}")
        np.testing.assert_allclose(layer.moving_mean.numpy(), expected.mean, rtol=1e-5,
                                   atol=1e-5, err_msg=f"call {i}: {mode}")
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected.var, rtol=1e-5,
                                   atol=1e-5, err_msg=f"call {i}: {mode}")
    assert sorted(traces) == sorted(BN_MODES)  # exactly one trace per mode


def test_weights_keep_keras_names_and_order():
    layer, _ = _pair((2, 3))
    assert [v.name for v in layer.weights] == ["gamma", "beta", "moving_mean",
                                               "moving_variance"]
    assert [v.trainable for v in layer.weights] == [True, True, False, False]
