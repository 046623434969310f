"""FGSM, PGD and MIM through CleverHans 4 (`cleverhans.tf2.attacks`), L-inf, true labels.

CleverHans' functions are called as they are, with two module attributes swapped while an
attack is built (`cleverhans_patched`): the gradient helper traces into the caller's
tf.function, and PGD's random start is stateless.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks import fast_gradient_method as _ch_fgm
from cleverhans.tf2.attacks import momentum_iterative_method as _ch_mim
from cleverhans.tf2.attacks import projected_gradient_descent as _ch_pgd

from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_epsilon, check_params,
                                    int64_labels)


@contextlib.contextmanager
def cleverhans_patched(seed=None):
    """CleverHans 4 with two module attributes swapped while the attack is built.

    * `compute_gradient` is a module-level tf.function taking `model_fn` as an argument, so
      every new Python callable retraces it, and nested in a tf.function replica step it
      fails under tf.distribute (merge_call). Its plain Python body
      (`compute_gradient.python_function`, the patch the CleverHans users' workaround
      documents, ecosystem.md §4) traces into the caller's one tf.function instead.
    * PGD's random start draws with the stateful `tf.random.uniform`; with `seed` it draws
      `tf.random.stateless_uniform(shape, seed, -eps, eps)` instead (L-inf only), the very
      noise `attacks.pgd` draws for the same seed, so a run repeats itself.

    The originals are restored on exit; the swap is process-wide while it lasts (not
    thread-safe, like any monkeypatch).
    """
    plain = _ch_fgm.compute_gradient.python_function
    saved = _ch_fgm.compute_gradient, _ch_mim.compute_gradient, _ch_pgd.random_lp_vector

    def stateless_linf_vector(shape, ord, eps, dtype=tf.float32, seed_=None):
        del ord, seed_  # only called with norm=np.inf (checked by the caller)
        return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), minval=-eps,
                                           maxval=eps, dtype=dtype)

    _ch_fgm.compute_gradient = _ch_mim.compute_gradient = plain
    if seed is not None:
        _ch_pgd.random_lp_vector = stateless_linf_vector
    try:
        yield
    finally:
        _ch_fgm.compute_gradient, _ch_mim.compute_gradient, _ch_pgd.random_lp_vector = saved


def fgsm(logits_fn: Callable, x, y, *, epsilon: float):
    """FGSM (Goodfellow et al.) via CleverHans' `fast_gradient_method`, L-inf.

    One step of `epsilon` along the sign of the cross-entropy gradient at the true labels,
    clipped to [0, 255]; a single step, so no `num_steps`. The norm-shaping paper uses
    epsilon 16 (0-255 scale).
    """
    check_epsilon(epsilon)
    with cleverhans_patched():
        return _ch_fgm.fast_gradient_method(logits_fn, x, float(epsilon), np.inf,
                                            clip_min=PIXEL_MIN, clip_max=PIXEL_MAX,
                                            y=int64_labels(y), sanity_checks=False)


def cleverhans_pgd(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int,
                   step_size: float, random_start: bool = False, seed=(0, 0)):
    """L-inf PGD via CleverHans' `projected_gradient_descent` on the true labels.

    Without a random start (CleverHans' default) this is BIM and, on integer-valued images
    with integer epsilon and step, equals `attacks.pgd(..., random_start=False)` bit for
    bit (tests/test_attack_suite.py). With `random_start` the start is uniform in the
    epsilon ball, drawn statelessly from `seed`, the same draw as `attacks.pgd`.
    `num_steps` is CleverHans' `nb_iter`.
    """
    check_params(epsilon, num_steps, step_size)
    if step_size > epsilon:  # CleverHans asserts it; say so in our terms
        raise ValueError(f"CleverHans PGD needs step_size <= epsilon, got {step_size} > "
                         f"{epsilon}")
    with cleverhans_patched(seed if random_start else None):
        return _ch_pgd.projected_gradient_descent(
            logits_fn, tf.cast(x, tf.float32), float(epsilon), float(step_size),
            int(num_steps), np.inf, clip_min=PIXEL_MIN, clip_max=PIXEL_MAX,
            y=int64_labels(y), rand_init=bool(random_start), sanity_checks=False)


def mim(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int, step_size: float,
        decay_factor: float = 1.0):
    """Momentum iterative FGSM (Dong et al. 2018) via CleverHans, L-inf, true labels.

    The gradient is normalized by its mean absolute value, accumulated with `decay_factor`,
    and its sign taken as a step of `step_size`; no random start (CleverHans). `num_steps`
    is CleverHans' `nb_iter`.
    """
    check_params(epsilon, num_steps, step_size)
    with cleverhans_patched():
        return _ch_mim.momentum_iterative_method(
            logits_fn, tf.cast(x, tf.float32), float(epsilon), float(step_size),
            int(num_steps), np.inf, clip_min=PIXEL_MIN, clip_max=PIXEL_MAX,
            y=int64_labels(y), decay_factor=float(decay_factor), sanity_checks=False)
