"""APGD-CE, APGD-T and Square (Croce & Hein 2020) on fixed batches, and their ensemble.

A TF2 port of the L-inf parts of AutoAttack (fra31/auto-attack, `autopgd_base.py`,
`square.py`, `autoattack.py`), on the 0-255 scale, with the same algorithms and defaults as
AutoAttack's "standard" version. Like the attacks in `madry_ns.attacks`, each takes
`logits_fn(x) -> logits`, x on 0-255 and labels y, and returns x_adv for the whole batch.

How this differs from the official AutoAttack (documented in docs/attacks_choice.md):

* **Fixed batches.** AutoAttack attacks only the points still robust, in sub-batches that
  shrink as points fall. A model normalizing with batch statistics classifies an image
  differently in a different batch, so here every run (each restart, each target class,
  Square's every query) forwards the full, fixed batch; an image already broken stays in
  the batch at its adversarial point (APGD keeps moving it; Square freezes it, as the
  official attack stops querying it). With a per-image model (population BN) an image's
  result still depends only on itself, its label and its random draws.
* **Per-image worst case.** `autoattack_style` runs APGD-CE, APGD-T and Square on the same
  clean batch (not sequentially on survivors) and counts an image as robust only if it is
  classified correctly on the clean batch and in the full output batch of every attack.
* **No FAB-T.** The standard version's third attack is left out (see the docs).
* **Returned points.** For images never broken, APGD returns the highest-loss iterate
  (the official returns the clean image); Square returns its current best point. Images
  broken are returned at the adversarial point, as in the official code.
* **Randomness.** Stateless draws from an explicit seed: the same seed repeats a run.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks import PIXEL_MAX, PIXEL_MIN, _labels, _per_image, xent_loss

# Square's p schedule (resc_schedule=False, as AutoAttack's standard version): p is p_init
# up to iteration 10 and halves after each of these iterations.
SQUARE_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def dlr_loss(logits, y):
    """Untargeted DLR, per example: -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12)."""
    z = tf.sort(logits, axis=1, direction="DESCENDING")
    z_y = tf.gather(logits, _labels(y), batch_dims=1)
    top_is_y = tf.equal(tf.argmax(logits, 1), _labels(y))
    best_other = tf.where(top_is_y, z[:, 1], z[:, 0])
    return -(z_y - best_other) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_loss_targeted(logits, y, target):
    """Targeted DLR: -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12)."""
    z = tf.sort(logits, axis=1, direction="DESCENDING")
    z_y = tf.gather(logits, _labels(y), batch_dims=1)
    z_t = tf.gather(logits, _labels(target), batch_dims=1)
    return -(z_y - z_t) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


def _fold(seed, data):
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), data)


def _check_linf(epsilon, num_steps):
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (0-255 scale), got {epsilon}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")


def _apgd_run(logits_fn, x, y, loss_fn, *, epsilon, num_steps, rho, seed, eot_samples=None):
    """One APGD run (`attack_single_run`, L-inf) on the full batch.

    Returns (x_best, robust, loss_best, x_best_adv): the highest-loss iterate, whether the
    image was classified correctly at every iterate, its best loss, and the last iterate
    at which it was misclassified. With `eot_samples`, see `apgd`.
    """
    x = tf.cast(x, tf.float32)
    lower = tf.maximum(x - epsilon, PIXEL_MIN)
    upper = tf.minimum(x + epsilon, PIXEL_MAX)
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
        call_seed = _fold(seed, call + 1)

        def add_draw(k, logits, loss, total):
            logits, loss, grad = one_draw(x_adv, _fold(call_seed, k))
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
    t = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0)
    t_max = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
    x_adv = tf.clip_by_value(x + epsilon * t / (t_max + 1e-12), PIXEL_MIN, PIXEL_MAX)
    logits, loss, grad = loss_and_grad(x_adv, 0)
    robust = tf.equal(tf.argmax(logits, 1), _labels(y))
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
        step = _per_image(s["step"], x)
        z = tf.clip_by_value(x_adv + step * tf.sign(s["grad"]), lower, upper)
        x_new = tf.clip_by_value(x_adv + (z - x_adv) * a + momentum * (1.0 - a), lower, upper)
        logits, loss, grad = loss_and_grad(x_new, i + 1)
        wrong = tf.not_equal(tf.argmax(logits, 1), _labels(y))
        robust = tf.logical_and(s["robust"], tf.logical_not(wrong))
        x_best_adv = tf.where(_per_image(wrong, x), x_new, s["x_best_adv"])
        loss_steps = tf.tensor_scatter_nd_update(s["loss_steps"], [[i]], loss[None])
        improved = loss > s["loss_best"]
        x_best = tf.where(_per_image(improved, x), x_new, s["x_best"])
        grad_best = tf.where(_per_image(improved, x), grad, s["grad_best"])
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
                    tf.where(_per_image(reduce, x), x_best, x_new),
                    tf.where(_per_image(reduce, x), grad_best, grad),
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
               eot_samples=None):
    """`num_runs` APGD runs on the full batch; per image the first adversarial point found,
    else the highest-loss point. `make_loss(run)` gives run `run`'s per-example loss."""
    x = tf.cast(x, tf.float32)

    def body(run, x_out, broken, loss_out):
        x_best, robust, loss_best, x_best_adv = _apgd_run(
            logits_fn, x, y, make_loss(run), epsilon=epsilon, num_steps=num_steps, rho=rho,
            seed=_fold(seed, run), eot_samples=eot_samples)
        newly = tf.logical_and(tf.logical_not(robust), tf.logical_not(broken))
        higher = tf.logical_and(tf.logical_not(tf.logical_or(broken, newly)),
                                loss_best > loss_out)
        x_out = tf.where(_per_image(newly, x), x_best_adv,
                         tf.where(_per_image(higher, x), x_best, x_out))
        return (run + 1, x_out, tf.logical_or(broken, newly),
                tf.where(higher, loss_best, loss_out))

    batch = tf.shape(x)[0]
    _, x_out, _, _ = tf.while_loop(
        lambda run, *_: run < num_runs, body,
        (tf.constant(0), x, tf.zeros([batch], tf.bool), tf.fill([batch], -float("inf"))))
    return x_out


def apgd(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
         num_restarts: int = 1, loss: str = "ce", rho: float = 0.75, seed=(0, 0),
         eot_samples: int | None = None):
    """APGD (L-inf) on cross-entropy (`loss="ce"`, APGD-CE) or untargeted DLR ("dlr").

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
    """
    _check_linf(epsilon, num_steps)
    losses = {"ce": xent_loss, "dlr": dlr_loss}
    if loss not in losses:
        raise ValueError(f"loss must be one of {sorted(losses)}, got {loss!r}")
    if eot_samples is not None and (int(eot_samples) != eot_samples or eot_samples < 1):
        raise ValueError(f"eot_samples must be a positive integer, got {eot_samples}")
    return _apgd_runs(logits_fn, x, y, num_restarts, lambda run: losses[loss],
                      epsilon=epsilon, num_steps=num_steps, rho=rho, seed=seed,
                      eot_samples=eot_samples)


def apgd_targeted(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
                  num_targets: int = 9, num_restarts: int = 1, rho: float = 0.75,
                  seed=(0, 0)):
    """APGD-T: APGD on the targeted DLR loss towards each of the `num_targets` classes
    ranked 2nd, 3rd, ... by the clean logits, `num_restarts` runs per target (AutoAttack
    standard: 9 targets, 1 run each). Returns per image the first adversarial point found
    over the targets, else the highest-loss point."""
    _check_linf(epsilon, num_steps)
    x = tf.cast(x, tf.float32)
    logits = logits_fn(x)
    num_classes = logits.shape[-1]
    if not 1 <= num_targets <= num_classes - 1 or num_classes < 4:
        raise ValueError(f"num_targets must be in 1..{num_classes - 1} and the targeted DLR "
                         f"loss needs >= 4 classes; got {num_targets} targets, "
                         f"{num_classes} classes")
    ranking = tf.argsort(logits, axis=1, direction="DESCENDING")

    def make_loss(run):
        target = ranking[:, 1 + run // num_restarts]
        return lambda z, labels: dlr_loss_targeted(z, labels, target)

    return _apgd_runs(logits_fn, x, y, num_targets * num_restarts, make_loss,
                      epsilon=epsilon, num_steps=num_steps, rho=rho, seed=seed)


def square_p(i, p_init: float = 0.8):
    """Square's fraction of pixels changed at iteration `i` (a scalar tensor)."""
    halvings = tf.add_n([tf.cast(i > n, tf.float32) for n in SQUARE_P_HALVINGS])
    return p_init * tf.pow(0.5, halvings)


def square(logits_fn: Callable, x, y, *, epsilon: float, num_queries: int = 5000,
           p_init: float = 0.8, seed=(0, 0)):
    """Square Attack (Andriushchenko et al. 2020), L-inf, margin loss, score-based.

    Uses only the logits, never a gradient. Starts from vertical stripes of ±epsilon
    (one sign per image, column and channel); each iteration draws one square window of
    side round(sqrt(p * H * W)) (p from `square_p`) and a sign per channel, shared by the
    batch as in the official code, sets the window to ±2 epsilon around the current best
    point, projects, and keeps the result per image if the margin z_y - max_{i≠y} z_i
    decreased or the image became misclassified. Misclassified images are frozen. Stops
    after `num_queries` iterations or when every image is misclassified.
    """
    _check_linf(epsilon, num_queries)
    x = tf.cast(x, tf.float32)
    y = _labels(y)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square needs images [batch, height, width, channels] of known "
                         f"size, got shape {x.shape}")
    height, width, channels = x.shape[1:]
    lower = tf.maximum(x - epsilon, PIXEL_MIN)
    upper = tf.minimum(x + epsilon, PIXEL_MAX)

    def margin(images):
        logits = logits_fn(images)
        onehot = tf.one_hot(y, tf.shape(logits)[-1]) > 0.5
        correct = tf.reduce_sum(tf.where(onehot, logits, 0.0), 1)
        return correct - tf.reduce_max(tf.where(onehot, -float("inf"), logits), 1)

    stripes = tf.random.stateless_uniform([tf.shape(x)[0], 1, width, channels],
                                          seed=_fold(seed, 0), minval=-1.0, maxval=1.0)
    x_best = tf.clip_by_value(x + epsilon * tf.sign(stripes), PIXEL_MIN, PIXEL_MAX)
    margin_min = margin(x_best)
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]

    def body(i, x_best, margin_min):
        side = tf.cast(tf.round(tf.sqrt(square_p(i, p_init) * height * width)), tf.int32)
        side = tf.clip_by_value(side, 1, min(height, width))
        u = tf.random.stateless_uniform([2 + channels], seed=_fold(seed, i + 1))
        top = tf.cast(tf.floor(u[0] * tf.cast(height - side, tf.float32)), tf.int32)
        left = tf.cast(tf.floor(u[1] * tf.cast(width - side, tf.float32)), tf.int32)
        window = tf.logical_and(tf.logical_and(rows >= top, rows < top + side),
                                tf.logical_and(cols >= left, cols < left + side))
        signs = tf.sign(2.0 * u[2:] - 1.0)
        delta = tf.where(window, 2.0 * epsilon * signs, 0.0)
        x_new = tf.clip_by_value(x_best + delta, lower, upper)
        active = margin_min > 0.0
        candidate = tf.where(_per_image(active, x), x_new, x_best)
        m = margin(candidate)
        improved = tf.logical_and(active, m < margin_min)
        return (i + 1, tf.where(_per_image(improved, x), x_new, x_best),
                tf.where(improved, m, margin_min))

    _, x_best, _ = tf.while_loop(
        lambda i, _, margin_min: tf.logical_and(i < num_queries,
                                                tf.reduce_any(margin_min > 0.0)),
        body, (tf.constant(0), x_best, margin_min))
    return x_best


ATTACKS = ("apgd-ce", "apgd-t", "square")


def autoattack_style(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
                     num_restarts: int = 1, num_targets: int = 9, num_queries: int = 5000,
                     rho: float = 0.75, p_init: float = 0.8, classify_fn: Callable | None = None,
                     seed=(0, 0)) -> dict:
    """APGD-CE, APGD-T and Square on one fixed batch; the per-image worst case.

    Each attack runs on the full clean batch with `logits_fn` (the generation forward);
    each attack's full output batch is then classified with `classify_fn` (the inference
    forward; default `logits_fn`). Returns a dict of tensors:

    * "clean", "apgd-ce", "apgd-t", "square": [B] bool, image classified correctly in that
      batch;
    * "robust": [B] bool, correct in all four (the robust accuracy is its mean);
    * "x_adv": per image the clean image if it is misclassified clean, else the output of
      the first attack (in the order above) that broke it, else APGD-CE's highest-loss
      point. Classifying this mixed batch again is the same only for per-image models.

    Defaults are AutoAttack's standard version minus FAB-T (module docstring).
    """
    classify_fn = classify_fn or logits_fn
    x = tf.cast(x, tf.float32)
    y = _labels(y)

    def correct(images):
        return tf.equal(tf.argmax(classify_fn(images), 1), y)

    outputs = {
        "apgd-ce": apgd(logits_fn, x, y, epsilon=epsilon, num_steps=num_steps,
                        num_restarts=num_restarts, loss="ce", rho=rho, seed=_fold(seed, 1)),
        "apgd-t": apgd_targeted(logits_fn, x, y, epsilon=epsilon, num_steps=num_steps,
                                num_targets=num_targets, num_restarts=num_restarts, rho=rho,
                                seed=_fold(seed, 2)),
        "square": square(logits_fn, x, y, epsilon=epsilon, num_queries=num_queries,
                         p_init=p_init, seed=_fold(seed, 3)),
    }
    result = {"clean": correct(x)}
    result.update({name: correct(images) for name, images in outputs.items()})
    robust = result["clean"]
    for name in ATTACKS:
        robust = tf.logical_and(robust, result[name])
    x_adv = outputs["apgd-ce"]
    for name in reversed(ATTACKS):  # the first attack that broke an image wins
        x_adv = tf.where(_per_image(tf.logical_not(result[name]), x), outputs[name], x_adv)
    result["x_adv"] = tf.where(_per_image(result["clean"], x), x_adv, x)
    result["robust"] = robust
    return result
