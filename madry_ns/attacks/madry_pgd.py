"""Madry's L-inf PGD (`LinfPGDAttack`, cifar10_challenge `pgd_attack.py`).

`pgd` ascends any scalar loss of the adversarial input; `pgd_attack(model, x, y, ...)` is
Madry's attack on a madry_ns model. They are not `tf.function`s themselves: callers compile
the surrounding step once (the training step, or `compile_pgd` for evaluation), and the
loop is a `tf.while_loop`, so the graph does not grow with `num_steps`.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.losses import get_loss
from madry_ns.attacks.utils import PIXEL_MAX, PIXEL_MIN, check_params, linf_box
from madry_ns.graph import function_for


def pgd(loss_fn: Callable, x, *, epsilon: float, num_steps: int, step_size: float,
        random_start: bool = True, seed=(0, 0), x_init=None, unroll: bool = False):
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
      unroll: a Python loop instead of `tf.while_loop`. Needed when the loss synchronizes
        across replicas (synchronized BN under a tf.distribute strategy): TensorFlow cannot
        place a cross-replica merge inside control flow. The graph then grows with num_steps.
    """
    def gradient(i, x_adv):
        del i  # a deterministic loss needs no per-step randomness
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = loss_fn(x_adv)
        return tape.gradient(loss, x_adv)

    return linf_ascent(gradient, x, epsilon=epsilon, num_steps=num_steps,
                       step_size=step_size, random_start=random_start, seed=seed,
                       x_init=x_init, unroll=unroll)


def linf_ascent(gradient: Callable, x, *, epsilon, num_steps, step_size, random_start, seed,
                x_init=None, unroll=False):
    """The sign-gradient loop of `pgd` and `eot_pgd`: `gradient(step, x_adv)` gives the
    ascent direction of step `step` (a scalar int32 tensor); start, projection and `unroll`
    as in `pgd`."""
    check_params(epsilon, num_steps, step_size)
    x = tf.cast(x, tf.float32)
    lower, upper = linf_box(x, epsilon)
    if x_init is not None:
        x_adv = tf.cast(x_init, tf.float32)
    elif random_start:
        noise = tf.random.stateless_uniform(tf.shape(x), seed=tf.cast(seed, tf.int64),
                                            minval=-epsilon, maxval=epsilon)
        x_adv = tf.clip_by_value(x + noise, PIXEL_MIN, PIXEL_MAX)
    else:
        x_adv = x

    def step(i, x_adv):
        grad = gradient(i, x_adv)
        x_adv = tf.clip_by_value(x_adv + step_size * tf.sign(grad), lower, upper)
        return i + 1, x_adv

    if unroll:
        for i in range(num_steps):
            _, x_adv = step(tf.constant(i), x_adv)
        return x_adv
    _, x_adv = tf.while_loop(lambda i, _: i < num_steps, step, (tf.constant(0), x_adv))
    return x_adv


def pgd_attack(model, x, y, *, epsilon: float, num_steps: int, step_size: float,
               random_start: bool = True, loss_func: str = "xent",
               bn_mode: str = "population", seed=(0, 0), x_init=None, unroll: bool = False):
    """Madry's `LinfPGDAttack.perturb` on a madry_ns model: maximize the summed loss
    `LOSSES[loss_func]` of `model(x_adv, bn_mode=bn_mode)`; the rest as `pgd`."""
    loss = get_loss(loss_func, keyword="loss_func")

    def loss_fn(x_adv):
        return tf.reduce_sum(loss(model(x_adv, bn_mode=bn_mode), y))

    return pgd(loss_fn, x, epsilon=epsilon, num_steps=num_steps, step_size=step_size,
               random_start=random_start, seed=seed, x_init=x_init, unroll=unroll)


def config_params(config) -> dict:
    """The PGD keyword arguments a config describes."""
    return dict(epsilon=config.epsilon, num_steps=config.num_steps, step_size=config.step_size,
                random_start=config.random_start, loss_func=config.loss_func)


def compile_pgd(model, config, bn_mode: str = "population"):
    """`fn(x, y, seed) -> x_adv`: PGD with the config's settings as one compiled function."""
    params = config_params(config)

    @function_for(model)(reduce_retracing=True)
    def attack(x, y, seed):
        return pgd_attack(model, x, y, bn_mode=bn_mode, seed=seed, **params)

    return attack

