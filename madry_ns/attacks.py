"""Attacks on Madry's 0-255 pixel scale.

Attacks are plain functions in the spirit of CleverHans: `pgd` ascends any scalar loss of
the adversarial input, and `pgd_attack(model, x, y, ...)` is Madry's `LinfPGDAttack` on a
model. They are not `tf.function`s themselves; callers compile the surrounding step once
(the training step, or `compile_pgd` for evaluation), and the loop is a `tf.while_loop`,
so the graph does not grow with `num_steps`. Randomness is stateless: the same seed gives
the same random start, which is what makes a resumed run repeat an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

PIXEL_MIN, PIXEL_MAX = 0.0, 255.0


def xent_loss(logits, y):
    """Per-example cross-entropy (Madry's `y_xent`); its sum is Madry's `xent`."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int64),
                                                          logits=logits)


def cw_loss(logits, y, kappa: float = 50.0):
    """Madry's CW margin, per example: -relu(z_y - max_{i != y} z_i + kappa).

    The true class is masked with -1e4 before the max (cifar10_challenge PR #1), so it can
    never be picked as the best wrong class.
    """
    mask = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits)[-1], dtype=logits.dtype)
    correct = tf.reduce_sum(mask * logits, axis=1)
    wrong = tf.reduce_max((1.0 - mask) * logits - 1e4 * mask, axis=1)
    return -tf.nn.relu(correct - wrong + kappa)


LOSSES: dict[str, Callable] = {"xent": xent_loss, "cw": cw_loss}


def check_params(epsilon: float, num_steps: int, step_size: float) -> None:
    """Raise ValueError for a budget no attack can honour."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (0-255 scale), got {epsilon}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0 (0-255 scale), got {step_size}")
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps}")


def pgd(loss_fn: Callable, x, *, epsilon: float, num_steps: int, step_size: float,
        random_start: bool = True, seed=(0, 0), x_init=None):
    """L-inf projected gradient ascent on `loss_fn(x_adv) -> scalar`, Madry's way.

    Uniform random start in [-epsilon, epsilon] clipped to [0, 255] (or the clean input),
    `num_steps` sign-gradient steps of `step_size`, each projected onto the epsilon ball and
    the [0, 255] box; the last iterate is returned (no restarts, no best-loss tracking).

    Args:
      loss_fn: maps the current iterate to the scalar to maximize; it decides the BN mode
        and whatever else rides along (for shaping, the fixed clean part of the batch).
      x: clean images, float on the 0-255 scale.
      seed: two integers for `tf.random.stateless_uniform`.
      x_init: a starting point instead of Madry's (TRADES starts at x + 0.001 N(0, 1)); it is
        not projected until the first step, as in TRADES.
    """
    check_params(epsilon, num_steps, step_size)
    x = tf.cast(x, tf.float32)
    # Madry clips to [x - eps, x + eps] and then to [0, 255]; the intersection is the same.
    lower = tf.maximum(x - epsilon, PIXEL_MIN)
    upper = tf.minimum(x + epsilon, PIXEL_MAX)
    if x_init is not None:
        x_adv = tf.cast(x_init, tf.float32)
    elif random_start:
        noise = tf.random.stateless_uniform(tf.shape(x), seed=tf.cast(seed, tf.int64),
                                            minval=-epsilon, maxval=epsilon)
        x_adv = tf.clip_by_value(x + noise, PIXEL_MIN, PIXEL_MAX)
    else:
        x_adv = x

    def step(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = loss_fn(x_adv)
        grad = tape.gradient(loss, x_adv)
        x_adv = tf.clip_by_value(x_adv + step_size * tf.sign(grad), lower, upper)
        return i + 1, x_adv

    _, x_adv = tf.while_loop(lambda i, _: i < num_steps, step, (tf.constant(0), x_adv))
    return x_adv


def pgd_attack(model, x, y, *, epsilon: float, num_steps: int, step_size: float,
               random_start: bool = True, loss_func: str = "xent",
               bn_mode: str = "population", seed=(0, 0)):
    """Madry's `LinfPGDAttack.perturb` on a madry_ns model: maximize the summed loss."""
    if loss_func not in LOSSES:
        raise ValueError(f"loss_func must be one of {sorted(LOSSES)}, got {loss_func!r}")
    loss = LOSSES[loss_func]

    def loss_fn(x_adv):
        return tf.reduce_sum(loss(model(x_adv, bn_mode=bn_mode), y))

    return pgd(loss_fn, x, epsilon=epsilon, num_steps=num_steps, step_size=step_size,
               random_start=random_start, seed=seed)


def config_params(config) -> dict:
    """The PGD keyword arguments a config describes."""
    return dict(epsilon=config.epsilon, num_steps=config.num_steps, step_size=config.step_size,
                random_start=config.random_start, loss_func=config.loss_func)


def compile_pgd(model, config, bn_mode: str = "population"):
    """`fn(x, y, seed) -> x_adv`: PGD with the config's settings as one compiled function."""
    params = config_params(config)

    @tf.function(reduce_retracing=True)
    def attack(x, y, seed):
        return pgd_attack(model, x, y, bn_mode=bn_mode, seed=seed, **params)

    return attack
