"""Helpers every attack of the package shares: the pixel box, budget checks, labels,
per-image masks, seed folding, and `compile_attack`."""

from __future__ import annotations

import inspect
from typing import Callable

import tensorflow as tf

PIXEL_MIN, PIXEL_MAX = 0.0, 255.0


def check_epsilon(epsilon: float) -> None:
    """Raise ValueError unless epsilon >= 0 (NaN fails)."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (0-255 scale), got {epsilon}")


def check_count(name: str, value, minimum: int = 0) -> None:
    """Raise ValueError unless `value` is an integer >= `minimum` (0 or 1); `name` is the
    keyword argument the message names."""
    if not (value >= minimum and int(value) == value):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer, got {value}")


def check_params(epsilon: float, num_steps: int, step_size: float) -> None:
    """Raise ValueError for an L-inf budget no attack can honour (zero steps allowed)."""
    check_epsilon(epsilon)
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0 (0-255 scale), got {step_size}")
    check_count("num_steps", num_steps)


def check_linf(epsilon: float, num_steps: int) -> None:
    """Raise ValueError unless epsilon >= 0 and num_steps is a positive integer (the attacks
    that need at least one iteration: APGD, Square)."""
    check_epsilon(epsilon)
    check_count("num_steps", num_steps, 1)


def linf_box(x, epsilon):
    """(lower, upper): the bounds of the epsilon ball around x intersected with the pixel
    box. Clipping to them is Madry's clip to [x - eps, x + eps] and then to [0, 255]."""
    return tf.maximum(x - epsilon, PIXEL_MIN), tf.minimum(x + epsilon, PIXEL_MAX)


def int64_labels(y):
    """Integer labels as int64, the dtype `tf.gather` and `tf.argmax` comparisons use."""
    return tf.cast(y, tf.int64)


def per_image(mask, x):
    """A [B] boolean mask shaped to broadcast against images x."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


def fold_seed(seed, data):
    """`stateless_fold_in(seed, data)`: an independent stateless seed for each `data`."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), data)


def uniform_per_image(seed, image_ids, shape):
    """U(-1, 1) draws of `shape`, one per image, from fold(seed, id) for each of `image_ids`:
    an image gets the same draw in any sub-batch (the survivors protocol needs that for an
    image's result not to depend on which other images are still attacked)."""
    return tf.map_fn(
        lambda i: tf.random.stateless_uniform(shape, seed=fold_seed(seed, i), minval=-1.0,
                                              maxval=1.0),
        tf.cast(image_ids, tf.int64), fn_output_signature=tf.float32)


def compile_attack(attack: Callable, logits_fn: Callable, **params):
    """`fn(x, y, seed) -> attack(logits_fn, x, y, **params)` as one tf.function.

    Traced once per input signature and reused; `seed` (two integers) is passed on to
    attacks that draw random numbers and ignored by the others, so every compiled attack
    has the same call signature. `params` are fixed Python values (CleverHans needs Python
    floats for its epsilon checks).
    """
    takes_seed = "seed" in inspect.signature(attack).parameters

    @tf.function(reduce_retracing=True)
    def run(x, y, seed):
        extra = {"seed": seed} if takes_seed else {}
        return attack(logits_fn, x, y, **params, **extra)

    return run
