"""Square Attack (Andriushchenko et al. 2020), L-inf, score-based: a TF2 port of
AutoAttack's `square.py` (fra31/auto-attack) on the 0-255 scale and on fixed batches."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_linf, fold_seed, int64_labels,
                                    linf_box, per_image, uniform_per_image)

# Square's p schedule (resc_schedule=False, as AutoAttack's standard version): p is p_init
# up to iteration 10 and halves after each of these iterations.
SQUARE_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(i, p_init: float = 0.8):
    """Square's fraction of pixels changed at iteration `i` (a scalar tensor)."""
    halvings = tf.add_n([tf.cast(i > n, tf.float32) for n in SQUARE_P_HALVINGS])
    return p_init * tf.pow(0.5, halvings)


def square(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 5000,
           p_init: float = 0.8, seed=(0, 0), survivors: bool = False, image_ids=None):
    """Square Attack (Andriushchenko et al. 2020), L-inf, margin loss, score-based.

    Uses only the logits, never a gradient. Starts from vertical stripes of ±epsilon
    (one sign per image, column and channel); each iteration draws one square window of
    side round(sqrt(p * H * W)) (p from `square_p`) and a sign per channel, shared by the
    batch as in the official code, sets the window to ±2 epsilon around the current best
    point, projects, and keeps the result per image if the margin z_y - max_{i≠y} z_i
    decreased or the image became misclassified. Misclassified images are frozen. Stops
    after `num_steps` iterations or when every image is misclassified.

    Each iteration is one query of the model (one forward of the batch), so `num_steps` is
    the query budget AutoAttack calls `n_queries` (standard version: 5000); the initial
    stripes cost one more forward.

    With `image_ids` ([B] ints) the stripes of image j are drawn from fold(seed, ids[j]) (the
    windows already are shared draws), so an image's result does not depend on the batch
    around it for a per-image model; with `survivors`, each query forwards only the images
    not yet misclassified (the official code; per-image models only).
    """
    check_linf(epsilon, num_steps)
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square needs images [batch, height, width, channels] of known "
                         f"size, got shape {x.shape}")
    height, width, channels = x.shape[1:]
    lower, upper = linf_box(x, epsilon)

    def margin(images, labels=None):
        labels = y if labels is None else labels
        logits = logits_fn(images)
        onehot = tf.one_hot(labels, tf.shape(logits)[-1]) > 0.5
        correct = tf.reduce_sum(tf.where(onehot, logits, 0.0), 1)
        return correct - tf.reduce_max(tf.where(onehot, -float("inf"), logits), 1)

    if image_ids is None:
        stripes = tf.random.stateless_uniform([tf.shape(x)[0], 1, width, channels],
                                              seed=fold_seed(seed, 0), minval=-1.0,
                                              maxval=1.0)
    else:
        stripes = uniform_per_image(fold_seed(seed, 0), image_ids, [1, width, channels])
    x_best = tf.clip_by_value(x + epsilon * tf.sign(stripes), PIXEL_MIN, PIXEL_MAX)
    margin_min = margin(x_best)
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]

    def body(i, x_best, margin_min):
        side = tf.cast(tf.round(tf.sqrt(square_p(i, p_init) * height * width)), tf.int32)
        side = tf.clip_by_value(side, 1, min(height, width))
        u = tf.random.stateless_uniform([2 + channels], seed=fold_seed(seed, i + 1))
        top = tf.cast(tf.floor(u[0] * tf.cast(height - side, tf.float32)), tf.int32)
        left = tf.cast(tf.floor(u[1] * tf.cast(width - side, tf.float32)), tf.int32)
        window = tf.logical_and(tf.logical_and(rows >= top, rows < top + side),
                                tf.logical_and(cols >= left, cols < left + side))
        signs = tf.sign(2.0 * u[2:] - 1.0)
        delta = tf.where(window, 2.0 * epsilon * signs, 0.0)
        x_new = tf.clip_by_value(x_best + delta, lower, upper)
        active = margin_min > 0.0
        if survivors:
            idx = tf.where(active)[:, 0][:, None]
            m = tf.tensor_scatter_nd_update(
                margin_min, idx, margin(tf.gather_nd(x_new, idx), tf.gather_nd(y, idx)))
        else:
            m = margin(tf.where(per_image(active, x), x_new, x_best))
        improved = tf.logical_and(active, m < margin_min)
        return (i + 1, tf.where(per_image(improved, x), x_new, x_best),
                tf.where(improved, m, margin_min))

    _, x_best, _ = tf.while_loop(
        lambda i, _, margin_min: tf.logical_and(i < num_steps,
                                                tf.reduce_any(margin_min > 0.0)),
        body, (tf.constant(0), x_best, margin_min))
    return x_best
