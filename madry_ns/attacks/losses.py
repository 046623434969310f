"""The per-example losses the attacks ascend, and `LOSSES`, the registry by name.

The names are the config's `loss_func` values ("xent", "cw") plus "dlr"; every attack that
takes a loss by name (`pgd_attack(loss_func=...)`, `apgd(loss=...)`) looks it up here.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from madry_ns.attacks.utils import int64_labels


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


def dlr_loss(logits, y):
    """Untargeted DLR (Croce & Hein 2020), per example:
    -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12)."""
    z = tf.sort(logits, axis=1, direction="DESCENDING")
    z_y = tf.gather(logits, int64_labels(y), batch_dims=1)
    top_is_y = tf.equal(tf.argmax(logits, 1), int64_labels(y))
    best_other = tf.where(top_is_y, z[:, 1], z[:, 0])
    return -(z_y - best_other) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_loss_targeted(logits, y, target):
    """Targeted DLR towards `target`: -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12).

    Not in `LOSSES`: it takes the target as a third argument (APGD-T builds it per run).
    """
    z = tf.sort(logits, axis=1, direction="DESCENDING")
    z_y = tf.gather(logits, int64_labels(y), batch_dims=1)
    z_t = tf.gather(logits, int64_labels(target), batch_dims=1)
    return -(z_y - z_t) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


LOSSES: dict[str, Callable] = {"xent": xent_loss, "cw": cw_loss, "dlr": dlr_loss}


def get_loss(name: str, allowed=None, keyword: str = "loss") -> Callable:
    """`LOSSES[name]`, or a ValueError naming `keyword` and the accepted names (`allowed`,
    default every key of `LOSSES`)."""
    allowed = tuple(LOSSES) if allowed is None else tuple(allowed)
    if name not in allowed:
        raise ValueError(f"{keyword} must be one of {sorted(allowed)}, got {name!r}")
    return LOSSES[name]
