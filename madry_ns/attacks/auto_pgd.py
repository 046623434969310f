"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), L-inf: APGD-CE, APGD-DLR and APGD-T.

A TF2 port of AutoAttack's `autopgd_base.py` (fra31/auto-attack) on the 0-255 scale and on
fixed batches; how it differs from the official code: `madry_ns.attacks.autoattack`.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.losses import dlr_loss_targeted, get_loss
from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_count, check_linf, fold_seed,
                                    int64_labels, linf_box, per_image, uniform_per_image)

# The losses `apgd(loss=...)` accepts: AutoAttack's APGD-CE and APGD-DLR.
APGD_LOSSES = ("xent", "dlr")


def apgd_single_run(logits_fn: Callable, x, y, loss_fn: Callable, *, epsilon: float,
                    num_steps: int, rho: float, seed, eot_samples: int | None = None,
                    image_ids=None):
    """One APGD run (AutoAttack's `attack_single_run`, L-inf) on the full batch;
    `loss_fn(logits, y)` is the per-example loss, `seed` an int64 [2] tensor.

    Returns (x_best, robust, loss_best, x_best_adv): the highest-loss iterate, whether the
    image was classified correctly at every iterate, its best loss, and the last iterate
    at which it was misclassified. With `eot_samples`, see `apgd`. With `image_ids` ([B]
    ints), image j's random start is drawn from fold(seed, image_ids[j]), the same in any
    sub-batch; without, one draw of the batch's shape (the fixed-batch ensemble's).
    """
    x = tf.cast(x, tf.float32)
    lower, upper = linf_box(x, epsilon)
    axes = list(range(1, x.shape.rank))
    n_iter_2 = max(int(0.22 * num_steps), 1)  # first checkpoint
    n_iter_min = max(int(0.06 * num_steps), 1)  # shortest interval between checkpoints
    size_decr = max(int(0.03 * num_steps), 1)

    def one_draw(x_adv, *draw_seed):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = logits_fn(x_adv, *draw_seed)
            loss = loss_fn(logits, y)
            total = tf.reduce_sum(loss)
        return logits, loss, tape.gradient(total, x_adv)

    def loss_and_grad(x_adv, call):
        if eot_samples is None:
            return one_draw(x_adv)
        # AutoAttack's eot_iter: the gradient is the mean over draws; the logits and loss of
        # the last draw drive the bookkeeping, as in the official code. Draw k of call c
        # (0 at the start, i + 1 at step i) uses fold(fold(seed, c + 1), k).
        call_seed = fold_seed(seed, call + 1)

        def add_draw(k, logits, loss, total):
            logits, loss, grad = one_draw(x_adv, fold_seed(call_seed, k))
            return k + 1, logits, loss, total + grad

        # The logits start empty (their class count is unknown before the first draw), so
        # the forward is traced once, inside the loop.
        batch = tf.shape(x_adv)[0]
        _, logits, loss, total = tf.while_loop(
            lambda k, *_: k < eot_samples, add_draw,
            (tf.constant(0), tf.zeros([batch, 0]), tf.zeros([batch]), tf.zeros_like(x_adv)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]),
                              tf.TensorShape([None]), x_adv.shape))
        return logits, loss, total / float(eot_samples)

    # Start at x + eps * t / max|t| with t ~ U(-1, 1): a random point whose largest
    # coordinate reaches the ball's boundary.
    if image_ids is None:
        t = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0)
    else:
        t = uniform_per_image(seed, image_ids, tf.shape(x)[1:])
    t_max = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
    x_adv = tf.clip_by_value(x + epsilon * t / (t_max + 1e-12), PIXEL_MIN, PIXEL_MAX)
    logits, loss, grad = loss_and_grad(x_adv, 0)
    robust = tf.equal(tf.argmax(logits, 1), int64_labels(y))
    batch = tf.shape(x)[0]
    state = dict(
        i=tf.constant(0), x_adv=x_adv, x_old=x_adv, grad=grad, x_best=x_adv, grad_best=grad,
        x_best_adv=x_adv, loss_best=loss, robust=robust,
        step=tf.fill(tf.shape(robust), 2.0 * epsilon),
        loss_steps=tf.zeros([num_steps, batch]), k=tf.constant(n_iter_2),
        counter=tf.constant(0), loss_best_last_check=loss,
        reduced_last_check=tf.ones_like(robust))

    def body(s):
        i = s["i"]
        x_adv = s["x_adv"]
        momentum = x_adv - s["x_old"]
        a = tf.where(i > 0, 0.75, 1.0)
        step = per_image(s["step"], x)
        z = tf.clip_by_value(x_adv + step * tf.sign(s["grad"]), lower, upper)
        x_new = tf.clip_by_value(x_adv + (z - x_adv) * a + momentum * (1.0 - a), lower, upper)
        logits, loss, grad = loss_and_grad(x_new, i + 1)
        wrong = tf.not_equal(tf.argmax(logits, 1), int64_labels(y))
        robust = tf.logical_and(s["robust"], tf.logical_not(wrong))
        x_best_adv = tf.where(per_image(wrong, x), x_new, s["x_best_adv"])
        loss_steps = tf.tensor_scatter_nd_update(s["loss_steps"], [[i]], loss[None])
        improved = loss > s["loss_best"]
        x_best = tf.where(per_image(improved, x), x_new, s["x_best"])
        grad_best = tf.where(per_image(improved, x), grad, s["grad_best"])
        loss_best = tf.where(improved, loss, s["loss_best"])
        counter = s["counter"] + 1
        k = s["k"]

        def checkpoint():
            # Halve the step where the loss rose in at most rho * k of the last k steps
            # (indices wrap as in the official code, which reads loss_steps[-1] at the first
            # checkpoint), or where the step was kept last time and the best loss has not
            # improved since; restart those images from their best point.
            c = tf.range(k)
            now = tf.gather(loss_steps, tf.math.floormod(i - c, num_steps))
            before = tf.gather(loss_steps, tf.math.floormod(i - c - 1, num_steps))
            rises = tf.reduce_sum(tf.cast(now > before, tf.float32), axis=0)
            oscillating = rises <= tf.cast(k, tf.float32) * rho
            stalled = tf.logical_and(tf.logical_not(s["reduced_last_check"]),
                                     s["loss_best_last_check"] >= loss_best)
            reduce = tf.logical_or(oscillating, stalled)
            return (tf.where(reduce, s["step"] / 2.0, s["step"]),
                    tf.where(per_image(reduce, x), x_best, x_new),
                    tf.where(per_image(reduce, x), grad_best, grad),
                    reduce, loss_best, tf.maximum(k - size_decr, n_iter_min), 0)

        def no_checkpoint():
            return (s["step"], x_new, grad, s["reduced_last_check"],
                    s["loss_best_last_check"], k, counter)

        step, x_next, grad, reduced, last_best, k, counter = tf.cond(
            tf.equal(counter, k), checkpoint, no_checkpoint)
        return [dict(
            i=i + 1, x_adv=x_next, x_old=x_adv, grad=grad, x_best=x_best,
            grad_best=grad_best, x_best_adv=x_best_adv, loss_best=loss_best, robust=robust,
            step=step, loss_steps=loss_steps, k=k, counter=counter,
            loss_best_last_check=last_best, reduced_last_check=reduced)]

    (s,) = tf.while_loop(lambda s: s["i"] < num_steps, body, [state])
    return s["x_best"], s["robust"], s["loss_best"], s["x_best_adv"]


def _apgd_runs(logits_fn, x, y, num_runs, make_loss, *, epsilon, num_steps, rho, seed,
               eot_samples=None, survivors=False, image_ids=None):
    """`num_runs` APGD runs on the full batch; per image the first adversarial point found,
    else the highest-loss point. `make_loss(run, idx)` gives run `run`'s per-example loss
    for the images `idx` (None: the whole batch).

    With `survivors`, each run attacks only the images no earlier run broke (the official
    `perturb`) and the runs stop when none is left; `image_ids` then seed the per-image
    random starts (default 0..B-1)."""
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    if survivors and image_ids is None:
        image_ids = tf.range(tf.cast(tf.shape(x)[0], tf.int64))

    def one_run(run, idx):
        if idx is None:
            return apgd_single_run(logits_fn, x, y, make_loss(run, None), epsilon=epsilon,
                                   num_steps=num_steps, rho=rho, seed=fold_seed(seed, run),
                                   eot_samples=eot_samples, image_ids=image_ids)
        out = apgd_single_run(logits_fn, tf.gather(x, idx), tf.gather(y, idx),
                              make_loss(run, idx), epsilon=epsilon, num_steps=num_steps,
                              rho=rho, seed=fold_seed(seed, run), eot_samples=eot_samples,
                              image_ids=tf.gather(image_ids, idx))
        # Back to full-batch tensors; images outside `idx` are marked robust at -inf loss, so
        # the update below leaves them as they are.
        def full(v, fill):
            return tf.tensor_scatter_nd_update(fill, idx[:, None], v)

        return (full(out[0], x), full(out[1], tf.ones_like(y, tf.bool)),
                full(out[2], tf.fill(tf.shape(y), -float("inf"))), full(out[3], x))

    def body(run, x_out, broken, loss_out):
        idx = tf.where(tf.logical_not(broken))[:, 0] if survivors else None
        x_best, robust, loss_best, x_best_adv = one_run(run, idx)
        newly = tf.logical_and(tf.logical_not(robust), tf.logical_not(broken))
        higher = tf.logical_and(tf.logical_not(tf.logical_or(broken, newly)),
                                loss_best > loss_out)
        x_out = tf.where(per_image(newly, x), x_best_adv,
                         tf.where(per_image(higher, x), x_best, x_out))
        return (run + 1, x_out, tf.logical_or(broken, newly),
                tf.where(higher, loss_best, loss_out))

    def more(run, x_out, broken, loss_out):
        go = run < num_runs
        return tf.logical_and(go, tf.reduce_any(tf.logical_not(broken))) if survivors else go

    batch = tf.shape(x)[0]
    _, x_out, _, _ = tf.while_loop(
        more, body,
        (tf.constant(0), x, tf.zeros([batch], tf.bool), tf.fill([batch], -float("inf"))))
    return x_out


def apgd(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
         num_restarts: int = 1, loss: str = "xent", rho: float = 0.75, seed=(0, 0),
         eot_samples: int | None = None, survivors: bool = False, image_ids=None):
    """APGD (L-inf) on cross-entropy (`loss="xent"`, APGD-CE) or untargeted DLR ("dlr").

    Momentum 0.75 (none on the first step), initial step 2 * epsilon, step halving at
    checkpoints 0.22 N, then intervals shrinking by 0.03 N down to 0.06 N, with restarts
    from the best point; `num_restarts` runs from independent random starts (AutoAttack
    standard: 1). Returns, per image, the first adversarial point found, else the
    highest-loss point.

    For randomized defenses, `eot_samples` K makes it AutoAttack's EOT variant (its 'rand'
    version runs APGD-CE and APGD-DLR with eot_iter 20): `logits_fn(x, draw_seed)` is then
    one random draw of the defense (an int64 [2] seed, as `attacks.eot_pgd`), every gradient
    is the mean over K draws, and the logits of the last draw decide the step-size
    bookkeeping and which iterate counts as adversarial.

    `survivors` and `image_ids`: restarts only on the images no earlier restart broke, with
    per-image random starts (`_apgd_runs`; for per-image models).
    """
    check_linf(epsilon, num_steps)
    loss_fn = get_loss(loss, APGD_LOSSES)
    if eot_samples is not None:
        check_count("eot_samples", eot_samples, 1)
    return _apgd_runs(logits_fn, x, y, num_restarts, lambda run, idx: loss_fn,
                      epsilon=epsilon, num_steps=num_steps, rho=rho, seed=seed,
                      eot_samples=eot_samples, survivors=survivors, image_ids=image_ids)


def apgd_targeted(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
                  num_targets: int = 9, num_restarts: int = 1, rho: float = 0.75,
                  seed=(0, 0), survivors: bool = False, image_ids=None):
    """APGD-T: APGD on the targeted DLR loss towards each of the `num_targets` classes
    ranked 2nd, 3rd, ... by the clean logits, `num_restarts` runs per target (AutoAttack
    standard: 9 targets, 1 run each). Returns per image the first adversarial point found
    over the targets, else the highest-loss point. `survivors`, `image_ids`: as `apgd`."""
    check_linf(epsilon, num_steps)
    x = tf.cast(x, tf.float32)
    logits = logits_fn(x)
    num_classes = logits.shape[-1]
    if not 1 <= num_targets <= num_classes - 1 or num_classes < 4:
        raise ValueError(f"num_targets must be in 1..{num_classes - 1} and the targeted DLR "
                         f"loss needs >= 4 classes; got {num_targets} targets, "
                         f"{num_classes} classes")
    ranking = tf.argsort(logits, axis=1, direction="DESCENDING")

    def make_loss(run, idx):
        target = ranking[:, 1 + run // num_restarts]
        target = target if idx is None else tf.gather(target, idx)
        return lambda z, labels: dlr_loss_targeted(z, labels, target)

    return _apgd_runs(logits_fn, x, y, num_targets * num_restarts, make_loss,
                      epsilon=epsilon, num_steps=num_steps, rho=rho, seed=seed,
                      survivors=survivors, image_ids=image_ids)
