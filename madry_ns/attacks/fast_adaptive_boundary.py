"""FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack"), L-inf: untargeted FAB and FAB-T, AutoAttack's third attack.

Written from the paper and AutoAttack's `fab_base.py` / `fab_pt.py` / `fab_projections.py`
(fra31/auto-attack), on the 0-255 scale. FAB searches the smallest L-inf perturbation that
changes the class: at each step it linearizes the decision boundary (the class difference
z_t - z_y and its gradient) and projects onto that hyperplane both the current iterate and the
clean image, then steps to a convex combination of the two projections (weight alpha on the
clean image's, at most alpha_max), overshooting by eta; once an iterate is adversarial, it is
pulled back towards the clean image by beta. An image counts as broken when a found
adversarial point is within `epsilon` of it (FAB itself is unbounded; `epsilon` is the
budget and the radius of the random restarts).

How this differs from the official code:

* **Projection.** `linf_projection` is solved in closed form by sorting the coordinates'
  room to the box and reading the breakpoint off cumulative sums, where the official code
  bisects over the same sorted breakpoints; both give the exact minimal L-inf step (the
  tests check it against a linear model, where FAB's first projection is the answer).
* **Fixed batches by default.** As `auto_pgd`: every run (each target class, each restart)
  forwards the full batch, which a batch-statistics model needs; `survivors=True` runs each
  target and restart only on the images no earlier one broke (the official behaviour, for
  per-image models).
* **Randomness.** Restarts after the first start at x + epsilon / 2 * t / max|t|,
  t ~ U(-1, 1) as in the official code, drawn statelessly per image from `seed` and the
  image's position in the batch (`image_ids`), so on a per-image model an image gets the
  same start in any sub-batch. FAB-T with AutoAttack's one restart draws nothing.
* **Untargeted FAB** takes the per-class gradients with one backward pass per class (the
  official code does the same with `backward(grad_mask)`).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_count, check_linf, fold_seed,
                                    int64_labels, per_image, uniform_per_image)

# A found adversarial point's distance before any is found (the official code's 1e10).
_NOT_FOUND = 1e10


def linf_projection(points, w, b, lower=PIXEL_MIN, upper=PIXEL_MAX):
    """The smallest L-inf step d with w . (t + d) = b and t + d in [lower, upper], per row.

    `points` t and `w` are [B, D], `b` is [B]. The reachable change of w . z within L-inf
    radius r is sum_i |w_i| min(r, room_i), where room_i is how far coordinate i can move in
    the direction that approaches the hyperplane before leaving the box; that sum is
    piecewise linear in r with breakpoints at the sorted rooms, so the radius reaching the
    hyperplane is read off cumulative sums at the first breakpoint where it is enough. When
    even the box's far corner does not reach it, d goes to that corner (the official code's
    choice: the closest the box gets). Coordinates with w_i = 0 do not move.
    """
    t = tf.convert_to_tensor(points, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    gap = tf.reduce_sum(w * t, 1) - b  # > 0: w . z must decrease
    direction = -tf.sign(gap)[:, None] * tf.sign(w)
    room = tf.where(direction > 0, upper - t, t - lower)
    room = tf.where(tf.equal(direction, 0.0), 0.0, tf.maximum(room, 0.0))
    weight = tf.abs(w) * tf.abs(direction)
    need = tf.abs(gap)
    order = tf.argsort(room, axis=1)
    r = tf.gather(room, order, batch_dims=1)
    a = tf.gather(weight, order, batch_dims=1)
    below = tf.cumsum(a * r, axis=1, exclusive=True)  # sum over coordinates with less room
    tail = tf.cumsum(a, axis=1, reverse=True)  # weight of the coordinates with at least r_k
    reach = below + r * tail  # the change at radius r_k, non-decreasing in k
    k = tf.reduce_sum(tf.cast(reach < need[:, None], tf.int32), axis=1)
    dim = tf.shape(t)[1]
    feasible = k < dim
    k_safe = tf.minimum(k, dim - 1)
    radius = ((need - tf.gather(below, k_safe, batch_dims=1))
              / tf.maximum(tf.gather(tail, k_safe, batch_dims=1), 1e-30))
    radius = tf.where(feasible, tf.maximum(radius, 0.0), float("inf"))
    return direction * tf.minimum(radius[:, None], room)


def _linf_norm(d):
    return tf.reduce_max(tf.abs(d), axis=1)


def fab_single_run(logits_fn: Callable, x, y, target=None, *, num_steps: int,
                   alpha_max: float, eta: float, beta: float, start=None):
    """One FAB run (the official `attack_single_run`, L-inf) from `start` (default the clean
    images) towards class `target` ([B] ints; None: untargeted, the closest linearized
    boundary of any class). Returns (x_adv, distance): per image the adversarial point of
    smallest L-inf distance found and that distance (1e10 where none was found; x_adv is
    then the clean image)."""
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    shape = tf.shape(x)
    batch = shape[0]
    x0 = tf.reshape(x, [batch, -1])
    x1 = x0 if start is None else tf.reshape(tf.cast(start, tf.float32), [batch, -1])

    def logits_of(flat):
        return logits_fn(tf.reshape(flat, shape))

    def boundary(flat):
        """(f, g): the linearized class difference f(z) = z_t - z_y at `flat` and its
        gradient, for the target or the closest class."""
        if target is not None:
            with tf.GradientTape() as tape:
                tape.watch(flat)
                logits = logits_of(flat)
                diff = (tf.gather(logits, int64_labels(target), batch_dims=1)
                        - tf.gather(logits, y, batch_dims=1))
                total = tf.reduce_sum(diff)
            return diff, tape.gradient(total, flat)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(flat)
            logits = logits_of(flat)
            per_class = [tf.reduce_sum(logits[:, c]) for c in range(logits.shape[-1])]
        grads = tf.stack([tape.gradient(z, flat) for z in per_class], 1)
        del tape
        true_grad = tf.gather(grads, y, batch_dims=1)
        diffs = logits - tf.gather(logits, y, batch_dims=1)[:, None]
        dgrads = grads - true_grad[:, None]
        onehot = tf.one_hot(y, logits.shape[-1]) > 0.5
        diffs_masked = tf.where(onehot, _NOT_FOUND, diffs)
        # The class whose linearized boundary is nearest in L-inf (the dual L1 norm).
        dist = tf.abs(diffs_masked) / (tf.reduce_sum(tf.abs(dgrads), 2) + 1e-12)
        nearest = tf.argmin(dist, 1)
        return (tf.gather(diffs_masked, nearest, batch_dims=1),
                tf.gather(dgrads, nearest, batch_dims=1))

    def body(i, x1, adv, dist):
        f, g = boundary(x1)
        b = tf.reduce_sum(g * x1, 1) - f
        d = linf_projection(tf.concat([x1, x0], 0), tf.concat([g, g], 0),
                            tf.concat([b, b], 0))
        d1, d2 = d[:batch], d[batch:]
        n1 = tf.maximum(_linf_norm(d1), 1e-8)
        n2 = tf.maximum(_linf_norm(d2), 1e-8)
        alpha = tf.clip_by_value(n1 / (n1 + n2), 0.0, alpha_max)[:, None]
        x1 = tf.clip_by_value((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha,
                              PIXEL_MIN, PIXEL_MAX)
        is_adv = tf.not_equal(tf.argmax(logits_of(x1), 1), y)
        t = _linf_norm(x1 - x0)
        closer = tf.logical_and(is_adv, t < dist)
        adv = tf.where(closer[:, None], x1, adv)
        dist = tf.where(closer, t, dist)
        x1 = tf.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
        return i + 1, x1, adv, dist

    _, _, adv, dist = tf.while_loop(
        lambda i, *_: i < num_steps, body,
        (tf.constant(0), x1, x0, tf.fill([batch], _NOT_FOUND)))
    return tf.reshape(adv, shape), dist


def _subset(mask, *tensors):
    """(indices, tensors gathered at the images where `mask` holds)."""
    idx = tf.where(mask)[:, 0]
    return idx, [tf.gather(t, idx) for t in tensors]


def fab(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
        num_restarts: int = 1, targeted: bool = True, num_targets: int = 9,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, seed=(0, 0),
        survivors: bool = False, image_ids=None):
    """FAB-T (`targeted=True`, AutoAttack's standard: 9 targets, 1 restart, 100 steps) or
    untargeted FAB, L-inf, budget `epsilon` (0-255 scale).

    FAB-T runs towards each of the `num_targets` classes ranked 2nd, 3rd, ... by the clean
    logits, `num_restarts` runs per target; the first run starts at the clean image, later
    ones at a random point of radius epsilon / 2 (official). alpha_max, eta and beta are the
    paper's (AutoAttack: 0.1, 1.05, 0.9). An image is broken by a run when the run finds an
    adversarial point within `epsilon`; returns per image the first such point over the runs
    (the one of smallest distance within that run), else the clean image, as the official
    `perturb`. With `survivors`, each run attacks only the images no earlier run broke (the
    official code; only for per-image models); `image_ids` (default 0..B-1) name the images
    for the per-image random starts.
    """
    check_linf(epsilon, num_steps)
    check_count("num_restarts", num_restarts, 1)
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    batch = tf.shape(x)[0]
    ids = tf.range(tf.cast(batch, tf.int64)) if image_ids is None else tf.cast(image_ids,
                                                                                 tf.int64)
    logits = logits_fn(x)
    num_classes = logits.shape[-1]
    if targeted and not 1 <= num_targets <= num_classes - 1:
        raise ValueError(f"num_targets must be in 1..{num_classes - 1} for {num_classes} "
                         f"classes, got {num_targets}")
    ranking = tf.argsort(logits, axis=1, direction="DESCENDING")
    num_runs = (num_targets if targeted else 1) * num_restarts
    # Images misclassified clean are never attacked (the official code returns them as they
    # are): they start out "broken".
    broken0 = tf.not_equal(tf.argmax(logits, 1), y)

    def run_on(run, x_s, y_s, rank_s, ids_s):
        restart = run % num_restarts
        target = rank_s[:, 1 + run // num_restarts] if targeted else None

        def random_start():
            t = uniform_per_image(fold_seed(seed, run), ids_s, tf.shape(x_s)[1:])
            t_max = tf.reduce_max(tf.abs(t), axis=list(range(1, x.shape.rank)),
                                  keepdims=True)
            return tf.clip_by_value(x_s + 0.5 * epsilon * t / (t_max + 1e-12),
                                    PIXEL_MIN, PIXEL_MAX)

        start = tf.cond(restart > 0, random_start, lambda: x_s)
        adv, dist = fab_single_run(logits_fn, x_s, y_s, target, num_steps=num_steps,
                                   alpha_max=alpha_max, eta=eta, beta=beta, start=start)
        return adv, dist <= epsilon

    def body(run, x_out, broken):
        if survivors:
            idx, (x_s, y_s, rank_s, ids_s) = _subset(tf.logical_not(broken), x, y, ranking,
                                                     ids)
            adv, hit = run_on(run, x_s, y_s, rank_s, ids_s)
            hit_idx = tf.gather(idx, tf.where(hit)[:, 0])[:, None]
            x_out = tf.tensor_scatter_nd_update(x_out, hit_idx, tf.boolean_mask(adv, hit))
            broken = tf.tensor_scatter_nd_update(broken, hit_idx,
                                                 tf.ones_like(hit_idx[:, 0], tf.bool))
            return run + 1, x_out, broken
        adv, hit = run_on(run, x, y, ranking, ids)
        newly = tf.logical_and(hit, tf.logical_not(broken))
        return (run + 1, tf.where(per_image(newly, x), adv, x_out),
                tf.logical_or(broken, newly))

    def more(run, x_out, broken):
        go = run < num_runs
        return tf.logical_and(go, tf.reduce_any(tf.logical_not(broken))) if survivors else go

    _, x_out, _ = tf.while_loop(more, body, (tf.constant(0), x, broken0))
    return x_out
