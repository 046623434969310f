"""PGD on Madry's 0-255 scale: invariants, hand-computed cases, CleverHans agreement, the
CW loss against numpy, argument checks, one compiled trace."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import attacks
from madry_ns import config as config_lib
from madry_ns.models import MadryWRN

EPS, STEP, STEPS = 8.0, 2.0, 10


@pytest.fixture(scope="module")
def model():
    """The narrow WRN on 16x16 inputs, with non-trivial BN statistics."""
    keras.utils.set_random_seed(0)
    m = MadryWRN(width=1)
    m(tf.zeros([1, 16, 16, 3]), bn_mode="population")
    m(tf.constant(_images(16, seed=9)), bn_mode="batch_update")  # moving stats != init
    return m


def _images(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _labels(n, seed=0):
    return np.random.default_rng(seed + 100).integers(0, 10, n).astype(np.int64)


def _summed_loss(model, x, y, loss_func):
    logits = model(tf.constant(x), bn_mode="population")
    return float(tf.reduce_sum(attacks.LOSSES[loss_func](logits, tf.constant(y))))


def _attack(model, x, y, **kwargs):
    params = dict(epsilon=EPS, num_steps=STEPS, step_size=STEP, random_start=True,
                  loss_func="xent", bn_mode="population", seed=(1, 2))
    params.update(kwargs)
    return attacks.pgd_attack(model, tf.constant(x), tf.constant(y), **params).numpy()


# ----------------------------------------------------------------------------------------
# Invariants


@pytest.mark.parametrize("loss_func", ["xent", "cw"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss(model, loss_func, random_start):
    x = _images(8)
    x[0] = 0.0      # pixels at the box edges: the projection must keep [0, 255]
    x[1] = 255.0
    y = _labels(8)
    x_adv = _attack(model, x, y, loss_func=loss_func, random_start=random_start)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.abs(x_adv.astype(np.float64) - x).max() <= EPS
    assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0
    assert np.abs(x_adv - x).max() == EPS          # the budget is used
    assert _summed_loss(model, x_adv, y, loss_func) > _summed_loss(model, x, y, loss_func)


def test_pgd_lowers_accuracy_of_the_attacked_model(model):
    x, y = _images(16, seed=4), _labels(16, seed=4)
    # Label each image with the model's own prediction, so clean accuracy is 100%.
    y = np.argmax(model(tf.constant(x), bn_mode="population").numpy(), 1)
    x_adv = _attack(model, x, y, epsilon=16.0, step_size=4.0)
    adv_pred = np.argmax(model(tf.constant(x_adv), bn_mode="population").numpy(), 1)
    assert (adv_pred == y).mean() < 0.5


def test_epsilon_zero_returns_the_clean_input(model):
    x, y = _images(4), _labels(4)
    for random_start in (True, False):
        np.testing.assert_array_equal(_attack(model, x, y, epsilon=0.0,
                                              random_start=random_start), x)


def test_zero_steps_returns_the_random_start_or_the_clean_input(model):
    x = np.full((4, 16, 16, 3), 128.0, np.float32)  # far from the box edges
    y = _labels(4)
    np.testing.assert_array_equal(_attack(model, x, y, num_steps=0, random_start=False), x)
    start = _attack(model, x, y, num_steps=0, random_start=True).astype(np.float64)
    noise = start - 128.0
    # Uniform on [-eps, eps]: mean 0, std eps / sqrt(3), 3,072 draws.
    assert np.abs(noise).max() <= EPS and np.abs(noise).max() > 0.99 * EPS
    assert abs(noise.mean()) < 0.3
    assert abs(noise.std() / (EPS / np.sqrt(3)) - 1) < 0.05
    assert len(np.unique(noise)) > 3000
    # At the box edge the start is clipped to [0, 255].
    zeros = _attack(model, np.zeros_like(x), y, num_steps=0)
    assert zeros.min() == 0.0 and zeros.max() <= EPS
    assert 0.4 < np.mean(zeros == 0.0) < 0.6


def test_same_seed_same_result_other_seed_differs(model):
    x, y = _images(4), _labels(4)
    a = _attack(model, x, y, seed=(5, 6))
    b = _attack(model, x, y, seed=(5, 6))
    c = _attack(model, x, y, seed=(5, 7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------
# Hand-computed cases on a linear loss


def test_linear_loss_hits_the_ball_corner_exactly():
    # Maximizing sum(w * x) over the ball and box: every pixel with w != 0 ends at
    # clip(x + eps * sign(w), 0, 255); pixels with w == 0 have no gradient and stay put.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 4, 4, 3)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    w[0, 0] = 0.0
    loss = lambda v: tf.reduce_sum(tf.constant(w) * v)  # noqa: E731
    corner = np.clip(x + EPS * np.sign(w), 0, 255)
    for steps, expected in [(1, np.clip(x + STEP * np.sign(w), 0, 255)),
                            (2, np.clip(x + 2 * STEP * np.sign(w), 0, 255)),
                            (4, corner), (10, corner)]:
        got = attacks.pgd(loss, tf.constant(x), epsilon=EPS, num_steps=steps,
                          step_size=STEP, random_start=False).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{steps} steps")
    # From a random start, 2 eps / step_size steps reach the corner from anywhere.
    got = attacks.pgd(loss, tf.constant(x), epsilon=EPS, num_steps=8, step_size=STEP,
                      random_start=True, seed=(3, 4)).numpy()
    moved = w != 0
    np.testing.assert_array_equal(got[moved], corner[moved])
    assert np.abs(got[~moved] - x[~moved]).max() <= EPS


def test_projection_after_each_step_not_only_at_the_end():
    # Step larger than eps: each iterate is projected, so the result is the corner.
    x = np.full((1, 2, 2, 1), 100.0, np.float32)
    w = np.array([1.0, -1.0, 1.0, -1.0], np.float32).reshape(x.shape)
    got = attacks.pgd(lambda v: tf.reduce_sum(w * v), tf.constant(x), epsilon=3.0,
                      num_steps=3, step_size=5.0, random_start=False).numpy()
    np.testing.assert_array_equal(got.ravel(), [103.0, 97.0, 103.0, 97.0])


# ----------------------------------------------------------------------------------------
# CleverHans


def _independent_cw(labels, logits):
    """Madry's CW margin written again for CleverHans (per example, maximized)."""
    onehot = tf.one_hot(labels, 10)
    correct = tf.reduce_sum(onehot * logits, 1)
    wrong = tf.reduce_max(tf.where(onehot > 0, -1e4 * tf.ones_like(logits), logits), 1)
    return -tf.nn.relu(correct - wrong + 50.0)


@pytest.mark.parametrize("loss_func", ["xent", "cw"])
def test_agrees_with_cleverhans_pgd_without_random_start(model, loss_func):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    x, y = _images(8, seed=1), _labels(8, seed=1)
    ours = _attack(model, x, y, random_start=False, loss_func=loss_func)
    loss_fn = {"xent": lambda labels, logits: tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits), "cw": _independent_cw}[loss_func]
    theirs = projected_gradient_descent(
        lambda v: model(v, bn_mode="population"), tf.constant(x), float(EPS), float(STEP),
        STEPS, np.inf, loss_fn=loss_fn, clip_min=0.0, clip_max=255.0, y=tf.constant(y),
        targeted=False, rand_init=False, sanity_checks=False).numpy()
    # Same iterates; a gradient component within an ulp of 0 may take the other sign.
    identical = np.mean(ours == theirs)
    assert identical >= 0.999, identical
    assert np.abs(ours - theirs).max() <= 2 * EPS
    assert np.abs(theirs - x).max() <= EPS


# ----------------------------------------------------------------------------------------
# Losses


def _numpy_madry_cw(logits, y):
    mask = np.eye(10)[y]
    correct = (mask * logits).sum(1)
    wrong = ((1 - mask) * logits - 1e4 * mask).max(1)
    return -np.maximum(correct - wrong + 50.0, 0.0)


def test_cw_loss_matches_madrys_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, (64, 10))
    y = rng.integers(0, 10, 64)
    logits[0] = 0.0                        # all tied
    logits[1, y[1]] = 500.0                # confidently right: loss far below 0
    logits[2] = -2e4                       # wrong logits below the -1e4 mask: Madry's max
    logits[3, y[3]] = -500.0               # wrong by more than kappa: loss 0 (the maximum)
    got = attacks.cw_loss(tf.constant(logits), tf.constant(y)).numpy()
    want = _numpy_madry_cw(logits, y)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    assert got[0] == -50.0 and got[1] < -500.0 and got[3] == 0.0
    # Otherwise it is the margin to the best wrong class: -relu(z_y - max_{j != y} z_j + 50).
    best_wrong = np.where(np.eye(10)[y] > 0, -np.inf, logits).max(1)
    ideal = -np.maximum(logits[np.arange(64), y] - best_wrong + 50, 0)
    np.testing.assert_allclose(got[3:], ideal[3:], rtol=1e-12, atol=1e-9)


def test_xent_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 5, (16, 10))
    y = rng.integers(0, 10, 16)
    shifted = logits - logits.max(1, keepdims=True)
    want = -(shifted[np.arange(16), y] - np.log(np.exp(shifted).sum(1)))
    np.testing.assert_allclose(attacks.xent_loss(tf.constant(logits), tf.constant(y)).numpy(),
                               want, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# Arguments and compilation


@pytest.mark.parametrize("kwargs, match", [
    ({"epsilon": -1.0}, "epsilon"), ({"epsilon": float("nan")}, "epsilon"),
    ({"step_size": 0.0}, "step_size"), ({"step_size": -2.0}, "step_size"),
    ({"num_steps": -1}, "num_steps"), ({"num_steps": 2.5}, "num_steps"),
    ({"loss_func": "l2"}, "loss_func"),
])
def test_invalid_parameters_raise_value_error(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _attack(model, _images(2), _labels(2), **kwargs)


def test_compile_pgd_is_one_trace_and_matches_eager(model):
    config = config_lib.from_dict({"epsilon": EPS, "num_steps": 3, "step_size": STEP})
    attack = attacks.compile_pgd(model, config, "population")
    for i in range(3):
        x, y = _images(4, seed=i), _labels(4, seed=i)
        got = attack(tf.constant(x), tf.constant(y), tf.constant([7, i], tf.int64)).numpy()
        if i == 0:
            eager = _attack(model, x, y, num_steps=3, seed=(7, 0))
            # Graph optimizations may round the random start differently by an ulp.
            np.testing.assert_allclose(got, eager, rtol=0, atol=1e-4)
    assert attack.experimental_get_tracing_count() == 1


def test_compiled_graph_does_not_grow_with_num_steps(model):
    # A tf.while_loop, not a Python loop unrolled num_steps times.
    sizes = []
    for steps in (1, 20):
        config = config_lib.from_dict({"num_steps": steps})
        attack = attacks.compile_pgd(model, config)
        graph = attack.get_concrete_function(
            tf.TensorSpec([None, 16, 16, 3], tf.float32), tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([2], tf.int64)).graph
        sizes.append(len(graph.get_operations()))
    assert sizes[0] == sizes[1]


def test_config_params_carry_madrys_keys():
    config = config_lib.from_dict({"epsilon": 4.0, "num_steps": 7, "step_size": 1.0,
                                   "random_start": False, "loss_func": "cw"})
    assert attacks.config_params(config) == {"epsilon": 4.0, "num_steps": 7, "step_size": 1.0,
                                             "random_start": False, "loss_func": "cw"}
