"""Batch-norm shaping (Zhang & Ma, ICTAI 2022): mixed clean/attacked batches and shaped inference.

The model always normalizes with batch statistics, and every batch it sees is dominated by
clean samples, so the statistics, and with them the decision boundary, barely move:

* training: a batch of m keeps its first k = floor(n m / (n + 1)) samples clean and attacks the
  last m - k; every PGD step runs the whole mixed batch through batch statistics (the attack
  sees, and differentiates through, the mixed batch's mean and variance); the clean slice never
  changes; the update uses the whole mixed batch;
* inference: each test chunk is concatenated after r clean training images per test image
  (references first, test last, as Eq. 6) and run with batch statistics without touching the
  moving averages (`batch_frozen`); only the test rows are read back.

This module owns the splits, the shaped attack and shaped forward; training.py and
evaluation.py call it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from madry_ns import attacks, inference, seeds
from madry_ns.config import shaping_split

__all__ = ["shaping_split", "kl_divergence", "attack_slice", "ReferencePool", "ShapedInference",
           "predict"]


def kl_divergence(p_logits, q_logits):
    """Per-example KL(p || q) from logits (TRADES: p = clean, q = adversarial)."""
    log_p = tf.nn.log_softmax(p_logits)
    log_q = tf.nn.log_softmax(q_logits)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def attack_slice(model, x, y, *, ratio: int, epsilon: float, num_steps: int, step_size: float,
                 bn_mode: str, seed, loss: str = "xent", loss_scope: str = "batch",
                 random_start: bool = True, p_clean_logits=None, init_std: float = 0.0,
                 x_init=None, unroll: bool = False):
    """The shaping attack of one training batch: returns the attacked slice `x[k:]` perturbed.

    Every PGD step forwards `concat([x[:k], x_adv])` in `bn_mode` (a batch mode), so the
    gradient includes the path through the mixed batch's statistics. `loss` is 'xent' or 'cw'
    (Madry, summed) or 'kl' (TRADES: KL(p_clean || p_adv) summed, with `p_clean_logits` the
    clean batch's logits). `loss_scope` 'batch' sums over all m rows (paper Eq. 5),
    'attacked' over the attacked rows only. For 'kl' the start is x + init_std * N(0, 1)
    (TRADES); otherwise Madry's uniform start when `random_start`; `x_init` overrides both.
    `unroll`: see `attacks.pgd`.
    """
    k, _ = shaping_split(int(x.shape[0]), ratio)
    x_clean, x_att = x[:k], x[k:]
    rows = slice(None) if loss_scope == "batch" else slice(k, None)

    def loss_fn(x_adv):
        logits = model(tf.concat([x_clean, x_adv], 0), bn_mode=bn_mode)
        if loss == "kl":
            per_example = kl_divergence(tf.stop_gradient(p_clean_logits), logits)
        else:
            per_example = attacks.LOSSES[loss](logits, y)
        return tf.reduce_sum(per_example[rows])

    if x_init is None and loss == "kl":
        x_init = x_att + init_std * tf.random.stateless_normal(tf.shape(x_att), seed=seed)
    return attacks.pgd(loss_fn, x_att, epsilon=epsilon, num_steps=num_steps,
                       step_size=step_size, random_start=random_start, seed=seed, x_init=x_init,
                       unroll=unroll)


class ReferencePool:
    """Clean, unaugmented training images from which shaped inference draws references."""

    def __init__(self, images: np.ndarray):
        if len(images) == 0:
            raise ValueError("the reference pool is empty")
        self.images = tf.constant(images)  # uint8, cast per draw (4x less memory)
        self.size = len(images)

    def draw(self, groups: int, per_group: int, seed):
        """[groups, per_group, 32, 32, 3] float32: each group distinct images (without
        replacement within a group), groups independent; stateless in `seed`."""
        if per_group > self.size:
            raise ValueError(f"cannot draw {per_group} distinct references from a pool of "
                             f"{self.size} images")
        keys = tf.random.stateless_uniform([groups, self.size], seed=seed)
        idx = tf.math.top_k(keys, k=per_group, sorted=False).indices
        return tf.cast(tf.gather(self.images, idx), tf.float32)


class ShapedInference:
    """BN+Shaping inference: test chunks of `chunk` images, each with `ratio * chunk` clean
    references, one `batch_frozen` forward per chunk of (1 + ratio) * chunk images.

    `logits(x, seed)` draws fresh references from `seed` (per chunk, independent), unless the
    instance was built with `fixed_seed`, in which case one draw of `ratio * chunk` references
    made once from that seed is reused for every chunk (the exact adaptive attack's premise).
    Nothing here updates the moving statistics.
    """

    def __init__(self, model, pool: ReferencePool, ratio: int, chunk: int,
                 fixed_seed=None):
        self.model, self.pool, self.ratio, self.chunk = model, pool, ratio, chunk
        self.fixed = None
        if fixed_seed is not None and ratio:
            self.fixed = pool.draw(1, ratio * chunk, tf.constant(fixed_seed, tf.int64))[0]

    def _forward(self, x_test, refs):
        x = tf.concat([refs, x_test], 0)
        return self.model(x, bn_mode="batch_frozen")[tf.shape(refs)[0]:]

    def _groups(self, x, seed, count):
        """Logits of `count` full chunks of x (shape [count * chunk, ...])."""
        xg = tf.reshape(x, [count, self.chunk] + x.shape.as_list()[1:])
        if self.ratio == 0:
            refs = tf.zeros([count, 0] + x.shape.as_list()[1:])
        elif self.fixed is not None:
            refs = tf.repeat(self.fixed[None], count, axis=0)
        else:
            refs = self.pool.draw(count, self.ratio * self.chunk, seed)
        logits = tf.map_fn(lambda a: self._forward(a[0], a[1]), (xg, refs),
                           fn_output_signature=tf.float32, parallel_iterations=1)
        return tf.reshape(logits, [count * self.chunk, -1])

    def logits(self, x, seed=(0, 0)):
        """Logits of test images x (any batch size; a final partial chunk keeps the 1:r ratio
        with fewer references)."""
        x = tf.convert_to_tensor(x, tf.float32)
        seed = tf.cast(seed, tf.int64)
        n = int(x.shape[0])
        full, rest = divmod(n, self.chunk)
        parts = []
        if full:
            parts.append(self._groups(x[:full * self.chunk], seed, full))
        if rest:
            tail = x[full * self.chunk:]
            if self.fixed is not None:
                refs = self.fixed[:self.ratio * rest]
            else:
                refs = self.pool.draw(1, self.ratio * rest,
                                      seed + [0, seeds.SHAPED_TAIL_OFFSET])[0]
            parts.append(self._forward(tail, refs))
        return tf.concat(parts, 0)


def predict(model, x, pool: ReferencePool, ratio: int, *, batch_size: int = 100,
            mixing: str = "per_batch", fixed_seed=None, seed=(0, 0)):
    """Shaped predictions (logits) for test images x; see `ShapedInference`.

    `mixing='per_batch'` puts batch_size / (ratio + 1) test images in each forward (the paper's
    evaluations: 10 test + 90 references at 1:9, batch 100); 'per_sample' gives every test image
    its own `ratio` references (Eq. 6).
    """
    chunk = inference.chunk_size(batch_size, ratio, mixing)
    if chunk < 1:
        raise ValueError(f"batch_size {batch_size} cannot hold 1 test image at ratio 1:{ratio}")
    return ShapedInference(model, pool, ratio, chunk, fixed_seed).logits(x, seed)
