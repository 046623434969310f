"""Carlini-Wagner L2 (Carlini & Wagner 2017), untargeted, after Carlini's reference code
(nn_robust_attacks `l2_attack.py`) and CleverHans' `carlini_wagner_l2`.

Our own port: CleverHans 4.0.0 deviates from Carlini's code (docs/attacks_choice.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_count, int64_labels,
                                    per_image)


def carlini_wagner_l2(logits_fn: Callable, x, y, *, confidence: float = 0.0,
                      learning_rate: float = 5e-3, binary_search_steps: int = 5,
                      num_steps: int = 1000, abort_early: bool = True,
                      initial_const: float = 1e-2):
    """Carlini-Wagner L2 (2017), untargeted, as Carlini's reference code and CleverHans.

    Minimizes ||x' - x||² + c · max(0, z_y - max_{i≠y} z_i + confidence) over x' =
    (tanh(w) + 1) / 2 in the box, with `num_steps` Adam steps on w (Carlini's and
    CleverHans' `max_iterations`) for every c (Adam reset each time), a per-image binary
    search of `binary_search_steps` over c (×10 until the first success, then bisection),
    and returns for each image the successful x' with the smallest L2 (the clean image
    where none succeeded). Success means argmax(z with z_y + confidence) ≠ y. Defaults are
    CleverHans'.

    The distance is measured on the [0, 1] scale internally (the image / 255), so `const`,
    `learning_rate` and `confidence` keep the meaning of CleverHans' defaults; the returned
    images are on the 0-255 scale. The whole batch is optimized together.

    Where CleverHans 4.0.0 deviates from Carlini's code this follows Carlini (and CleverHans
    v3): the binary search uses the success of the current search step, `confidence` is
    added to the true logit only in the success test, `const` is one number per image (4.0.0
    broadcasts an image-shaped const, which fails for batches), Adam is TF1's (epsilon 1e-8).
    The early abort compares the batch loss every num_steps // 10 steps with the previous
    check's, skipping the first check as CleverHans 4 does (Carlini started from 1e6, which
    aborts at once whenever a batch loss exceeds it).
    """
    check_count("binary_search_steps", binary_search_steps, 1)
    check_count("num_steps", num_steps, 1)
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    w0 = tf.atanh(((x - PIXEL_MIN) / (PIXEL_MAX - PIXEL_MIN) * 2.0 - 1.0) * 0.999999)
    x0 = (tf.tanh(w0) + 1.0) / 2.0  # the reference point the distance is measured from
    batch = tf.shape(x)[0]
    axes = list(range(1, x.shape.rank))
    check_every = max(num_steps // 10, 1)
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

    def to_pixels(unit):
        return unit * (PIXEL_MAX - PIXEL_MIN) + PIXEL_MIN

    def succeeded(logits):
        onehot = tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)
        return tf.not_equal(tf.argmax(logits + confidence * onehot, 1), y)

    def objective(modifier, const):
        with tf.GradientTape() as tape:
            tape.watch(modifier)
            x_new = (tf.tanh(w0 + modifier) + 1.0) / 2.0
            logits = logits_fn(to_pixels(x_new))
            l2 = tf.reduce_sum(tf.square(x_new - x0), axis=axes)
            onehot = tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)
            real = tf.reduce_sum(onehot * logits, 1)
            other = tf.reduce_max((1.0 - onehot) * logits - onehot * 10000.0, 1)
            loss = tf.reduce_sum(const * tf.maximum(0.0, real - other + confidence)) + \
                tf.reduce_sum(l2)
        return x_new, logits, l2, loss, tape.gradient(loss, modifier)

    def search_step(outer, const, lower, upper, best_l2, best_attack):
        if binary_search_steps >= 10:  # Carlini's "repeat": the last step uses the bound
            const = tf.where(outer == binary_search_steps - 1, upper, const)

        def descend(it, modifier, m, v, prev, stop, cur_success, best_l2, best_attack):
            x_new, logits, l2, loss, grad = objective(modifier, const)
            t = tf.cast(it + 1, tf.float32)
            m = beta1 * m + (1.0 - beta1) * grad
            v = beta2 * v + (1.0 - beta2) * tf.square(grad)
            lr = learning_rate * tf.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
            modifier = modifier - lr * m / (tf.sqrt(v) + adam_eps)
            check = tf.logical_and(abort_early, tf.equal(it % check_every, 0))
            stop = tf.logical_and(check, loss > prev * 0.9999)
            prev = tf.where(check, loss, prev)
            # Carlini breaks before recording this iteration's values.
            ok = tf.logical_and(tf.logical_not(stop), succeeded(logits))
            cur_success = tf.logical_or(cur_success, ok)
            better = tf.logical_and(ok, l2 < best_l2)
            best_l2 = tf.where(better, l2, best_l2)
            best_attack = tf.where(per_image(better, x), x_new, best_attack)
            return it + 1, modifier, m, v, prev, stop, cur_success, best_l2, best_attack

        zeros = tf.zeros_like(x)
        _, _, _, _, _, _, success, best_l2, best_attack = tf.while_loop(
            lambda it, *state: tf.logical_and(it < num_steps, tf.logical_not(state[4])),
            descend,
            (tf.constant(0), zeros, zeros, zeros, tf.constant(np.inf, tf.float32),
             tf.constant(False), tf.zeros([batch], tf.bool), best_l2, best_attack))
        return const, success, best_l2, best_attack

    def outer_body(outer, const, lower, upper, best_l2, best_attack):
        const, success, best_l2, best_attack = search_step(outer, const, lower, upper,
                                                           best_l2, best_attack)
        upper = tf.where(success, tf.minimum(upper, const), upper)
        lower = tf.where(success, lower, tf.maximum(lower, const))
        bounded = upper < 1e9
        const = tf.where(bounded, (lower + upper) / 2.0,
                         tf.where(success, const, const * 10.0))
        return outer + 1, const, lower, upper, best_l2, best_attack

    init = (tf.constant(0), tf.fill([batch], float(initial_const)), tf.zeros([batch]),
            tf.fill([batch], 1e10), tf.fill([batch], 1e10), x0)
    _, _, _, _, best_l2, best_attack = tf.while_loop(
        lambda outer, *_: outer < binary_search_steps, outer_body, init)
    found = per_image(best_l2 < 1e10, x)
    return tf.where(found, to_pixels(best_attack), x)
