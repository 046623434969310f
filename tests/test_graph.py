"""madry_ns.graph: AutoGraph is off for the toolkit's own models and on for models users
bring, and switching it off changes nothing the training step computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import graph, training
from madry_ns.models import MadryWRN

from conftest import make_tiny_config


def _branches_on_a_tensor(x):
    if tf.reduce_sum(x) > 0:  # Python control flow on a tensor: needs AutoGraph
        return x + 1.0
    return x - 1.0


def test_autograph_is_off_for_toolkit_models_and_on_for_plain_keras_models():
    toolkit = MadryWRN(width=1, input_shape=(8, 8, 1), num_classes=3).build_for_input()
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    x = tf.ones([2, 3])
    with pytest.raises(TypeError, match="as a Python `bool` is not allowed"):
        graph.function_for(toolkit)(_branches_on_a_tensor)(x)
    np.testing.assert_array_equal(graph.function_for(plain)(_branches_on_a_tensor)(x), x + 1.0)


def _two_steps(config, compile_fn, monkeypatch):
    monkeypatch.setattr(training, "function_for", lambda model: compile_fn)
    keras.utils.set_random_seed(0)
    model = MadryWRN(width=1, input_shape=(16, 16, 3)).build_for_input()
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, config)
    x = tf.random.stateless_uniform([8, 16, 16, 3], (1, 2), maxval=255.0)
    y = tf.constant([0, 1, 2, 3, 4, 5, 6, 7], tf.int64)
    metrics = [step(x, y, tf.constant(s, tf.int64)) for s in range(2)]
    return [v.numpy() for v in model.weights], [float(m["total_loss"]) for m in metrics]


def test_the_training_step_computes_the_same_with_autograph_off(tmp_path, monkeypatch):
    """Bit for bit: weights, BN moving statistics and losses after two shaping steps (n = 3:
    the split, PGD through the mixed batch's statistics, the update), compiled with AutoGraph
    (tf.function) and without (graph_function)."""
    config = make_tiny_config(tmp_path, shaping_ratio=3)
    on_weights, on_losses = _two_steps(config, tf.function, monkeypatch)
    off_weights, off_losses = _two_steps(config, graph.graph_function, monkeypatch)
    assert on_losses == off_losses
    for a, b in zip(on_weights, off_weights):
        np.testing.assert_array_equal(a, b)
