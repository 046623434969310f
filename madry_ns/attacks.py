"""Attacks on Madry's 0-255 pixel scale.

Attacks are plain functions in the spirit of CleverHans: `pgd` ascends any scalar loss of
the adversarial input, and `pgd_attack(model, x, y, ...)` is Madry's `LinfPGDAttack` on a
model. They are not `tf.function`s themselves; callers compile the surrounding step once
(the training step, or `compile_pgd` for evaluation), and the loop is a `tf.while_loop`,
so the graph does not grow with `num_steps`. Randomness is stateless: the same seed gives
the same random start, which is what makes a resumed run repeat an uninterrupted one.

The evaluation attacks below take `logits_fn(x) -> logits` instead of a model: FGSM, PGD and
MIM through CleverHans 4 (`fgsm`, `cleverhans_pgd`, `mim`), DeepFool as CleverHans v3
(`deepfool`), Carlini-Wagner L2 (`carlini_wagner_l2`), and EOT-PGD (`eot_pgd`) for random
defenses; APGD, Square and the AutoAttack-style ensemble are in `madry_ns.autoattack`.
`compile_attack` turns any of them into one compiled `fn(x, y, seed)`. Why DeepFool and CW
are our own: docs/attacks_choice.md.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks import fast_gradient_method as _ch_fgm
from cleverhans.tf2.attacks import momentum_iterative_method as _ch_mim
from cleverhans.tf2.attacks import projected_gradient_descent as _ch_pgd

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

    return _linf_ascent(gradient, x, epsilon=epsilon, num_steps=num_steps,
                        step_size=step_size, random_start=random_start, seed=seed,
                        x_init=x_init, unroll=unroll)


def _linf_ascent(gradient: Callable, x, *, epsilon, num_steps, step_size, random_start, seed,
                 x_init=None, unroll=False):
    """The loop shared by `pgd` and `eot_pgd`: `gradient(step, x_adv)` gives the ascent
    direction of step `step` (a scalar int32 tensor)."""
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
    """Madry's `LinfPGDAttack.perturb` on a madry_ns model: maximize the summed loss."""
    if loss_func not in LOSSES:
        raise ValueError(f"loss_func must be one of {sorted(LOSSES)}, got {loss_func!r}")
    loss = LOSSES[loss_func]

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

    @tf.function(reduce_retracing=True)
    def attack(x, y, seed):
        return pgd_attack(model, x, y, bn_mode=bn_mode, seed=seed, **params)

    return attack


# ----------------------------------------------------------------------------------------
# The evaluation attacks. Each takes `logits_fn(x) -> logits` (the caller decides the BN
# mode, shaping, random paths), x on the 0-255 scale and integer labels y, and returns x_adv
# for the whole batch: the batch is never split or shrunk, since a model that normalizes
# with batch statistics classifies each image differently in a different batch. Loops are
# tf.while_loops and randomness is stateless, so each attack can be wrapped in one
# tf.function (`compile_attack`) and repeats itself under a seed.


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


def _labels(y):
    return tf.cast(y, tf.int64)


# -- FGSM, PGD, MIM through CleverHans 4 ---------------------------------------------------

@contextlib.contextmanager
def _cleverhans_patched(seed=None):
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
    clipped to [0, 255]. The norm-shaping paper uses epsilon 16 (0-255 scale).
    """
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (0-255 scale), got {epsilon}")
    with _cleverhans_patched():
        return _ch_fgm.fast_gradient_method(logits_fn, x, float(epsilon), np.inf,
                                            clip_min=PIXEL_MIN, clip_max=PIXEL_MAX,
                                            y=_labels(y), sanity_checks=False)


def cleverhans_pgd(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int,
                   step_size: float, random_start: bool = False, seed=(0, 0)):
    """L-inf PGD via CleverHans' `projected_gradient_descent` on the true labels.

    Without a random start (CleverHans' default) this is BIM and, on integer-valued images
    with integer epsilon and step, equals `attacks.pgd(..., random_start=False)` bit for
    bit (tests/test_attack_suite.py). With `random_start` the start is uniform in the
    epsilon ball, drawn statelessly from `seed`, the same draw as `attacks.pgd`.
    """
    check_params(epsilon, num_steps, step_size)
    if step_size > epsilon:  # CleverHans asserts it; say so in our terms
        raise ValueError(f"CleverHans PGD needs step_size <= epsilon, got {step_size} > "
                         f"{epsilon}")
    with _cleverhans_patched(seed if random_start else None):
        return _ch_pgd.projected_gradient_descent(
            logits_fn, tf.cast(x, tf.float32), float(epsilon), float(step_size),
            int(num_steps), np.inf, clip_min=PIXEL_MIN, clip_max=PIXEL_MAX, y=_labels(y),
            rand_init=bool(random_start), sanity_checks=False)


def mim(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int, step_size: float,
        decay_factor: float = 1.0):
    """Momentum iterative FGSM (Dong et al. 2018) via CleverHans, L-inf, true labels.

    The gradient is normalized by its mean absolute value, accumulated with `decay_factor`,
    and its sign taken as a step of `step_size`; no random start (CleverHans).
    """
    check_params(epsilon, num_steps, step_size)
    with _cleverhans_patched():
        return _ch_mim.momentum_iterative_method(
            logits_fn, tf.cast(x, tf.float32), float(epsilon), float(step_size),
            int(num_steps), np.inf, clip_min=PIXEL_MIN, clip_max=PIXEL_MAX, y=_labels(y),
            decay_factor=float(decay_factor), sanity_checks=False)


# -- DeepFool (CleverHans v3) ---------------------------------------------------------------


def deepfool(logits_fn: Callable, x, y=None, *, nb_candidate: int = 10,
             overshoot: float = 0.02, max_iter: int = 50):
    """L2 DeepFool (Moosavi-Dezfooli et al. 2016) exactly as CleverHans v3's `DeepFool`.

    Untargeted and unbounded: it looks for the smallest L2 step across the nearest
    linearized decision boundary. The reference class is the model's *prediction* on x
    (`y` is accepted for a uniform attack signature and not used, as in CleverHans v3).
    Each iteration linearizes the top-`nb_candidate` logits at the current point (index 0
    is the current top class), and every image still classified as its reference class
    moves by (|f_k| + 1e-5) / ||w_k|| along w_k / ||w_k|| for the closest candidate k.
    The iterate is x + r_tot clipped to [0, 255]; the `overshoot` is applied once at the
    end: clip(x + (1 + overshoot) r_tot). Gradients of each candidate logit are taken of
    its sum over the batch (CleverHans' `jacobian_graph`), so a batch-statistics forward
    contributes its cross-image terms as it does there.

    Differs from v3 only where v3 would produce NaN: if every candidate's gradient
    difference is zero, the image does not move (v3 reused the previous image's w).
    """
    if not 2 <= nb_candidate:
        raise ValueError(f"nb_candidate must be >= 2, got {nb_candidate}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter}")
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
        r_tot = r_tot + tf.where(_per_image(active, x), step, 0.0)
        x_adv = tf.clip_by_value(x + r_tot, PIXEL_MIN, PIXEL_MAX)
        active = tf.equal(tf.argmax(logits_fn(x_adv), 1), original)
        return it + 1, r_tot, active

    _, r_tot, _ = tf.while_loop(
        lambda it, r_tot, active: tf.logical_and(it < max_iter, tf.reduce_any(active)),
        body, (tf.constant(0), tf.zeros_like(x), tf.ones_like(original, tf.bool)))
    return tf.clip_by_value(x + (1.0 + overshoot) * r_tot, PIXEL_MIN, PIXEL_MAX)


def _per_image(mask, x):
    """A [B] boolean mask shaped to broadcast against images x."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


# -- Carlini-Wagner L2 ----------------------------------------------------------------------


def carlini_wagner_l2(logits_fn: Callable, x, y, *, confidence: float = 0.0,
                      learning_rate: float = 5e-3, binary_search_steps: int = 5,
                      max_iterations: int = 1000, abort_early: bool = True,
                      initial_const: float = 1e-2):
    """Carlini-Wagner L2 (2017), untargeted, as Carlini's reference code and CleverHans.

    Minimizes ||x' - x||² + c · max(0, z_y - max_{i≠y} z_i + confidence) over x' =
    (tanh(w) + 1) / 2 in the box, with Adam on w (reset for every c), a per-image binary
    search over c (×10 until the first success, then bisection), and returns for each image
    the successful x' with the smallest L2 (the clean image where none succeeded). Success
    means argmax(z with z_y + confidence) ≠ y. Defaults are CleverHans'.

    The distance is measured on the [0, 1] scale internally (the image / 255), so `const`,
    `learning_rate` and `confidence` keep the meaning of CleverHans' defaults; the returned
    images are on the 0-255 scale. The whole batch is optimized together.

    Where CleverHans 4.0.0 deviates from Carlini's code this follows Carlini (and CleverHans
    v3): the binary search uses the success of the current search step, `confidence` is
    added to the true logit only in the success test, `const` is one number per image (4.0.0
    broadcasts an image-shaped const, which fails for batches), Adam is TF1's (epsilon 1e-8).
    The early abort compares the batch loss every max_iterations // 10 steps with the
    previous check's, skipping the first check as CleverHans 4 does (Carlini started from
    1e6, which aborts at once whenever a batch loss exceeds it).
    """
    if not binary_search_steps >= 1 or int(binary_search_steps) != binary_search_steps:
        raise ValueError(f"binary_search_steps must be a positive integer, got "
                         f"{binary_search_steps}")
    if not max_iterations >= 1 or int(max_iterations) != max_iterations:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations}")
    x = tf.cast(x, tf.float32)
    y = _labels(y)
    w0 = tf.atanh(((x - PIXEL_MIN) / (PIXEL_MAX - PIXEL_MIN) * 2.0 - 1.0) * 0.999999)
    x0 = (tf.tanh(w0) + 1.0) / 2.0  # the reference point the distance is measured from
    batch = tf.shape(x)[0]
    axes = list(range(1, x.shape.rank))
    check_every = max(max_iterations // 10, 1)
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
            best_attack = tf.where(_per_image(better, x), x_new, best_attack)
            return it + 1, modifier, m, v, prev, stop, cur_success, best_l2, best_attack

        zeros = tf.zeros_like(x)
        _, _, _, _, _, _, success, best_l2, best_attack = tf.while_loop(
            lambda it, *state: tf.logical_and(it < max_iterations, tf.logical_not(state[4])),
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
    found = _per_image(best_l2 < 1e10, x)
    return tf.where(found, to_pixels(best_attack), x)


# -- EOT ------------------------------------------------------------------------------------


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
    if int(eot_samples) != eot_samples or eot_samples < 1:
        raise ValueError(f"eot_samples must be a positive integer, got {eot_samples}")
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

    return _linf_ascent(gradient, x, epsilon=epsilon, num_steps=num_steps,
                        step_size=step_size, random_start=random_start, seed=seed)
