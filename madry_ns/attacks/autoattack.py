"""The AutoAttack-style ensemble (Croce & Hein 2020) of APGD-CE, APGD-T and Square.

With `auto_pgd` and `square_attack`, a TF2 port of the L-inf parts of AutoAttack
(fra31/auto-attack, `autopgd_base.py`, `square.py`, `autoattack.py`), on the 0-255 scale,
with the same algorithms and defaults as AutoAttack's "standard" version. Like every attack
of `madry_ns.attacks`, each takes `logits_fn(x) -> logits`, x on 0-255 and labels y, and
returns x_adv for the whole batch.

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

from madry_ns.attacks.auto_pgd import apgd, apgd_targeted
from madry_ns.attacks.square_attack import square
from madry_ns.attacks.utils import fold_seed, int64_labels, per_image

# The ensemble's attacks by AutoAttack's published names, in the order `x_adv` prefers them.
ATTACKS = ("apgd-ce", "apgd-t", "square")


def autoattack_style(logits_fn: Callable, x, y, *, epsilon: float, num_steps: int = 100,
                     num_restarts: int = 1, num_targets: int = 9,
                     square_num_steps: int = 5000, rho: float = 0.75, p_init: float = 0.8,
                     classify_fn: Callable | None = None, seed=(0, 0)) -> dict:
    """APGD-CE, APGD-T and Square on one fixed batch; the per-image worst case.

    `num_steps`, `num_restarts` and `rho` are APGD-CE's and APGD-T's, `num_targets`
    APGD-T's; `square_num_steps` and `p_init` are Square's (its `num_steps`, one query
    each).

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
    y = int64_labels(y)

    def correct(images):
        return tf.equal(tf.argmax(classify_fn(images), 1), y)

    outputs = {
        "apgd-ce": apgd(logits_fn, x, y, epsilon=epsilon, num_steps=num_steps,
                        num_restarts=num_restarts, loss="xent", rho=rho,
                        seed=fold_seed(seed, 1)),
        "apgd-t": apgd_targeted(logits_fn, x, y, epsilon=epsilon, num_steps=num_steps,
                                num_targets=num_targets, num_restarts=num_restarts, rho=rho,
                                seed=fold_seed(seed, 2)),
        "square": square(logits_fn, x, y, epsilon=epsilon, num_steps=square_num_steps,
                         p_init=p_init, seed=fold_seed(seed, 3)),
    }
    result = {"clean": correct(x)}
    result.update({name: correct(images) for name, images in outputs.items()})
    robust = result["clean"]
    for name in ATTACKS:
        robust = tf.logical_and(robust, result[name])
    x_adv = outputs["apgd-ce"]
    for name in reversed(ATTACKS):  # the first attack that broke an image wins
        x_adv = tf.where(per_image(tf.logical_not(result[name]), x), outputs[name], x_adv)
    result["x_adv"] = tf.where(per_image(result["clean"], x), x_adv, x)
    result["robust"] = robust
    return result
