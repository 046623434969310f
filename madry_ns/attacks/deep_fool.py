"""DeepFool (Moosavi-Dezfooli et al. 2016), L2, as CleverHans v3's `DeepFool`.

Our own port: CleverHans 4 has no DeepFool (docs/attacks_choice.md).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.utils import PIXEL_MAX, PIXEL_MIN, check_count, per_image


def deepfool(logits_fn: Callable, x, y=None, *, nb_candidate: int = 10,
             overshoot: float = 0.02, num_steps: int = 50):
    """L2 DeepFool (Moosavi-Dezfooli et al. 2016) exactly as CleverHans v3's `DeepFool`.

    Untargeted and unbounded: it looks for the smallest L2 step across the nearest
    linearized decision boundary. The reference class is the model's *prediction* on x
    (`y` is accepted for a uniform attack signature and not used, as in CleverHans v3).
    Each of at most `num_steps` iterations (v3's `max_iter`) linearizes the
    top-`nb_candidate` logits at the current point (index 0 is the current top class), and
    every image still classified as its reference class moves by (|f_k| + 1e-5) / ||w_k||
    along w_k / ||w_k|| for the closest candidate k; the loop stops early once every image
    has left its class. The iterate is x + r_tot clipped to [0, 255]; the `overshoot` is
    applied once at the end: clip(x + (1 + overshoot) r_tot). Gradients of each candidate
    logit are taken of its sum over the batch (CleverHans' `jacobian_graph`), so a
    batch-statistics forward contributes its cross-image terms as it does there.

    Differs from v3 only where v3 would produce NaN: if every candidate's gradient
    difference is zero, the image does not move (v3 reused the previous image's w).
    """
    if not 2 <= nb_candidate:
        raise ValueError(f"nb_candidate must be >= 2, got {nb_candidate}")
    check_count("num_steps", num_steps)
    del y
    x = tf.cast(x, tf.float32)
    logits = logits_fn(x)
    num_classes = logits.shape[-1]
    if nb_candidate > num_classes:
        raise ValueError(f"nb_candidate ({nb_candidate}) exceeds the number of classes "
                         f"({num_classes})")
    original = tf.argmax(logits, 1)
    features = list(range(2, x.shape.rank + 1))  # per-image axes of [B, K, ...] tensors

    def body(it, r_tot, active):
        x_adv = tf.clip_by_value(x + r_tot, PIXEL_MIN, PIXEL_MAX)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x_adv)
            preds = tf.math.top_k(logits_fn(x_adv), k=nb_candidate).values
            sums = [tf.reduce_sum(preds[:, k]) for k in range(nb_candidate)]
        grads = tf.stack([tape.gradient(s, x_adv) for s in sums], axis=1)
        del tape
        w = grads[:, 1:] - grads[:, :1]
        f = preds[:, 1:] - preds[:, :1]
        w_norm = tf.sqrt(tf.reduce_sum(tf.square(w), axis=features))
        pert = (tf.abs(f) + 1e-5) / w_norm  # +inf where w_k = 0: never the minimum
        best = tf.argmin(pert, axis=1)  # first minimum, as v3's strict `<`
        pert_best = tf.gather(pert, best, batch_dims=1)
        w_best = tf.gather(w, best, batch_dims=1)
        scale = pert_best / tf.gather(w_norm, best, batch_dims=1)
        step = tf.reshape(tf.where(tf.math.is_finite(scale), scale, 0.0),
                          [-1] + [1] * (x.shape.rank - 1)) * w_best
        r_tot = r_tot + tf.where(per_image(active, x), step, 0.0)
        x_adv = tf.clip_by_value(x + r_tot, PIXEL_MIN, PIXEL_MAX)
        active = tf.equal(tf.argmax(logits_fn(x_adv), 1), original)
        return it + 1, r_tot, active

    _, r_tot, _ = tf.while_loop(
        lambda it, r_tot, active: tf.logical_and(it < num_steps, tf.reduce_any(active)),
        body, (tf.constant(0), tf.zeros_like(x), tf.ones_like(original, tf.bool)))
    return tf.clip_by_value(x + (1.0 + overshoot) * r_tot, PIXEL_MIN, PIXEL_MAX)
