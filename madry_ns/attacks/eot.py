"""EOT-PGD: Madry's PGD on the expectation of a random loss (Athalye et al. 2018), for
randomized defenses (random shaping references, RNA paths)."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.madry_pgd import linf_ascent
from madry_ns.attacks.utils import check_count


def eot_pgd(loss_fn: Callable, x, *, epsilon: float, num_steps: int, step_size: float,
            eot_samples: int, random_start: bool = True, seed=(0, 0)):
    """`pgd` on the expectation of a random loss (Athalye et al.'s EOT).

    `loss_fn(x_adv, draw_seed) -> scalar` evaluates one random draw of a stochastic
    defense (random shaping references, an RNA path) chosen statelessly by `draw_seed`
    (an int64 [2] tensor). Each step averages the gradient over `eot_samples` draws and
    takes a sign step; draw k of step i uses fold_in(fold_in(seed, i), k), so the attack is
    deterministic under `seed` and draws differ across steps. The random start is the one
    `pgd` draws for the same seed: with one sample and a loss that ignores its seed this
    is exactly `pgd`.
    """
    check_count("eot_samples", eot_samples, 1)
    seed = tf.cast(seed, tf.int64)

    def gradient(i, x_adv):
        step_seed = tf.random.experimental.stateless_fold_in(seed, i)

        def add_draw(k, total):
            draw_seed = tf.random.experimental.stateless_fold_in(step_seed, k)
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = loss_fn(x_adv, draw_seed)
            return k + 1, total + tape.gradient(loss, x_adv)

        _, total = tf.while_loop(lambda k, _: k < eot_samples, add_draw,
                                 (tf.constant(0), tf.zeros_like(x_adv)))
        return total / float(eot_samples)

    return linf_ascent(gradient, x, epsilon=epsilon, num_steps=num_steps,
                       step_size=step_size, random_start=random_start, seed=seed)
