"""AutoAttack (Croce & Hein 2020): its versions `standard`, `plus`, `rand` and `custom`
(`auto_attack`), and the earlier ensemble of APGD-CE, APGD-T and Square (`autoattack_style`).

With `auto_pgd`, `fab` and `square_attack`, a TF2 port of the L-inf parts of AutoAttack
(fra31/auto-attack, `autopgd_base.py`, `fab_base.py`, `square.py`, `autoattack.py`), on the
0-255 scale. Like every attack of `madry_ns.attacks`, each takes `logits_fn(x) -> logits`,
x on 0-255 and labels y.

`auto_attack` runs a version's attacks in the official order under one of two protocols:

* **survivors** (`survivors=True`, the official protocol): each attack, and inside it each
  restart and target class, runs only on the images every earlier one failed on. Only
  valid for per-image forwards (population BN, plain models), where an image's logits do
  not depend on the batch it is in.
* **fixed batch**: every attack runs on the full clean batch and an image is robust when
  every attack's full output batch classifies it correctly, as `autoattack_style` below;
  needed for batch-statistics, shaped and random forwards.

Every random draw of `auto_attack` is per image (seeded by the image's position in the batch)
and every step is per image, so on a per-image model both protocols give the same result
image by image; survivors only costs less. Deviations from the official code besides the
protocol: each attack's own module; `auto_attack` takes survivors within each batch the caller
passes, `auto_attack_survivors` re-batches the survivors of a whole set, as the official code
does; FAB-T and APGD-T run one restart per target in every version, as the official code
hard-codes.

`autoattack_style`, the suite's earlier ensemble (its `legacy` version), kept as it was so that
recorded results repeat. How it differs from the official AutoAttack (documented in
docs/attacks_choice.md):

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

import dataclasses
from typing import Callable

import tensorflow as tf

from madry_ns.attacks.auto_pgd import apgd, apgd_targeted
from madry_ns.attacks.fast_adaptive_boundary import fab
from madry_ns.attacks.square_attack import square
from madry_ns.attacks.utils import check_count, fold_seed, int64_labels, per_image

# The ensemble's attacks by AutoAttack's published names, in the order `x_adv` prefers them.
ATTACKS = ("apgd-ce", "apgd-t", "square")

# The official versions' attacks, in the official order (autoattack.py `set_version`).
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
# Every attack `auto_attack` can run, with the number its seed is folded with (the legacy
# ensemble's 1-3 for its three).
AUTOATTACK_ATTACKS = {"apgd-ce": 1, "apgd-t": 2, "square": 3, "fab-t": 4, "apgd-dlr": 5,
                      "fab": 6}


@dataclasses.dataclass(frozen=True)
class AutoAttackParams:
    """Every parameter of `auto_attack`; the defaults are the official `standard` version.

    `apgd_restarts` and `apgd_eot_samples` are APGD-CE's and APGD-DLR's (1 sample: no EOT);
    APGD-T runs `apgd_targets` targets with one restart each and shares `apgd_steps` and
    `rho`. `fab_restarts` is untargeted FAB's; FAB-T runs `fab_targets` targets with one
    restart each (the official code sets its n_restarts to 1); both share `fab_steps`,
    `alpha_max`, `eta`, `beta`. Square: `square_queries`, `p_init`.
    """

    attacks: tuple = VERSIONS["standard"]
    apgd_steps: int = 100
    apgd_restarts: int = 1
    apgd_targets: int = 9
    rho: float = 0.75
    apgd_eot_samples: int = 1
    fab_steps: int = 100
    fab_restarts: int = 1
    fab_targets: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    square_queries: int = 5000
    p_init: float = 0.8

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in AUTOATTACK_ATTACKS]
        if unknown or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks must be distinct names among "
                             f"{', '.join(AUTOATTACK_ATTACKS)}, got {self.attacks}")
        for name in ("apgd_steps", "apgd_restarts", "apgd_targets", "apgd_eot_samples",
                     "fab_steps", "fab_restarts", "fab_targets", "square_queries"):
            check_count(name, getattr(self, name), 1)
        for name in ("rho", "alpha_max", "beta", "p_init"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.eta >= 1:
            raise ValueError(f"eta must be >= 1 (FAB's overshoot), got {self.eta}")


def version_params(version: str) -> AutoAttackParams:
    """The official parameters of AutoAttack's `standard`, `plus` or `rand` version (L-inf):
    plus runs APGD-CE, APGD-DLR and FAB with 5 restarts; rand runs APGD-CE and APGD-DLR with
    1 restart and EOT over 20 draws."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    changes = {"plus": dict(apgd_restarts=5, fab_restarts=5),
               "rand": dict(apgd_eot_samples=20)}.get(version, {})
    return AutoAttackParams(attacks=VERSIONS[version], **changes)


def _run_attack(name, logits_fn, x, y, p: AutoAttackParams, epsilon, seed, survivors, ids):
    seed = fold_seed(seed, AUTOATTACK_ATTACKS[name])
    common = dict(epsilon=epsilon, seed=seed, survivors=survivors, image_ids=ids)
    if name in ("apgd-ce", "apgd-dlr"):
        eot = p.apgd_eot_samples if p.apgd_eot_samples > 1 else None
        return apgd(logits_fn, x, y, num_steps=p.apgd_steps, num_restarts=p.apgd_restarts,
                    loss="xent" if name == "apgd-ce" else "dlr", rho=p.rho,
                    eot_samples=eot, **common)
    if name == "apgd-t":
        return apgd_targeted(logits_fn, x, y, num_steps=p.apgd_steps,
                             num_targets=p.apgd_targets, num_restarts=1, rho=p.rho, **common)
    if name in ("fab", "fab-t"):
        targeted = name == "fab-t"
        return fab(logits_fn, x, y, num_steps=p.fab_steps,
                   num_restarts=1 if targeted else p.fab_restarts, targeted=targeted,
                   num_targets=p.fab_targets, alpha_max=p.alpha_max, eta=p.eta, beta=p.beta,
                   **common)
    return square(logits_fn, x, y, num_steps=p.square_queries, p_init=p.p_init, **common)


def auto_attack(logits_fn: Callable, x, y, *, epsilon: float,
               params: AutoAttackParams = AutoAttackParams(), survivors: bool = False,
               classify_fn: Callable | None = None, seed=(0, 0)) -> dict:
    """AutoAttack's attacks `params.attacks` (default: the standard version) on one batch,
    under the survivors protocol (`survivors=True`, per-image forwards only) or on the fixed
    batch (module docstring).

    `logits_fn(x)` is the generation forward (with EOT, `logits_fn(x, draw_seed)` is one
    random draw); `classify_fn` (default `logits_fn`) judges each attack's output. Returns a
    dict of tensors: "clean" and one per attack, [B] bool (classified correctly in that
    attack's output; under survivors, images the attack did not need to run on count as
    correct), "robust" (correct in all: the robust accuracy is its mean) and "x_adv" (per
    image the clean image if misclassified clean, else the output of the first attack that
    broke it, else the first attack's output).
    """
    classify_fn = classify_fn or logits_fn
    x = tf.cast(x, tf.float32)
    y = int64_labels(y)
    ids = tf.range(tf.cast(tf.shape(x)[0], tf.int64))

    def correct(images, labels):
        return tf.equal(tf.argmax(classify_fn(images), 1), labels)

    clean = correct(x, y)
    result = {"clean": clean}
    robust, x_adv = clean, None
    for name in params.attacks:
        if survivors:
            idx = tf.where(robust)[:, 0]
            x_s, y_s = tf.gather(x, idx), tf.gather(y, idx)

            def attack_survivors(name=name, x_s=x_s, y_s=y_s, idx=idx):
                adv_s = _run_attack(name, logits_fn, x_s, y_s, params, epsilon, seed, True,
                                    idx)
                return adv_s, correct(adv_s, y_s)

            # With no survivors left the attack is skipped, as the official code skips it;
            # it must be: TensorFlow's CPU convolution returns an empty batch's input
            # unchanged, so any forward of no images fails at the next layer.
            adv_s, ok_s = tf.cond(tf.size(idx) > 0, attack_survivors,
                                  lambda x_s=x_s: (x_s, tf.zeros([0], tf.bool)))
            ok = tf.tensor_scatter_nd_update(tf.ones_like(robust), idx[:, None], ok_s)
            adv = tf.tensor_scatter_nd_update(x if x_adv is None else x_adv, idx[:, None],
                                              adv_s)
        else:
            adv = _run_attack(name, logits_fn, x, y, params, epsilon, seed, False, ids)
            ok = correct(adv, y)
        result[name] = ok
        newly = tf.logical_and(robust, tf.logical_not(ok))
        x_adv = adv if x_adv is None else tf.where(per_image(newly, x), adv, x_adv)
        robust = tf.logical_and(robust, ok)
    result["x_adv"] = tf.where(per_image(clean, x), x_adv, x)
    result["robust"] = robust
    return result


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


def auto_attack_survivors(logits_fn: Callable, x, y, *, epsilon: float, batch_size: int,
                          params: AutoAttackParams = AutoAttackParams(), seed=(0, 0),
                          state: dict | None = None, on_chunk: Callable | None = None) -> dict:
    """AutoAttack's official survivors protocol over a whole set (per-image forwards only).

    As the official `run_standard_evaluation`: one clean pass, then each attack of
    `params.attacks` in turn on every image still robust, re-batched in chunks of
    `batch_size`, so an attack costs its steps once per chunk of survivors, not once per
    batch of the set. `x`, `y` are arrays of the whole set; image j's random draws come from
    fold(seed, j), so the result does not depend on `batch_size` and equals `auto_attack`
    with survivors on the whole set as one batch.

    After each chunk `on_chunk(state)` gets a JSON-able dict (the attack and chunk reached,
    the flags so far); passing it back as `state` continues after that chunk. Returns numpy
    [N] bool arrays: "clean", one per attack (classified correctly in its output; images it
    did not run on count as correct) and "robust". Each call traces its attacks anew:
    `survivors_runner` keeps them traced across calls.
    """
    run = survivors_runner(logits_fn, epsilon=epsilon, batch_size=batch_size, params=params)
    return run(x, y, seed, state=state, on_chunk=on_chunk)


def survivors_runner(logits_fn: Callable, *, epsilon: float, batch_size: int,
                     params: AutoAttackParams = AutoAttackParams()) -> Callable:
    """`run(x, y, seed, state=None, on_chunk=None)`: `auto_attack_survivors` with its
    attacks traced once, for many sets."""
    import numpy as np

    check_count("batch_size", batch_size, 1)

    @tf.function(reduce_retracing=True)
    def classify(images, labels):
        return tf.equal(tf.argmax(logits_fn(images), 1), labels)

    def compiled(name):
        @tf.function(reduce_retracing=True)
        def run(xs, ys, ids, seed):
            adv = _run_attack(name, logits_fn, xs, ys, params, epsilon, seed, True, ids)
            return classify(adv, ys)
        return run

    attack = {name: compiled(name) for name in params.attacks}

    def run(x, y, seed=(0, 0), state: dict | None = None, on_chunk: Callable | None = None):
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        n = len(x)
        seed = tf.constant(seed, tf.int64)
        if state is None:
            clean = np.concatenate([classify(x[i:i + batch_size], y[i:i + batch_size]).numpy()
                                    for i in range(0, n, batch_size)])
            state = {"clean": clean.tolist(), "attack": 0, "chunk": 0,
                     "survivors": np.flatnonzero(clean).tolist(),
                     "correct": {name: [True] * n for name in params.attacks}}
            if on_chunk is not None:
                on_chunk(state)
        correct = {name: np.array(v, bool) for name, v in state["correct"].items()}
        robust = np.array(state["clean"], bool)
        for name in params.attacks:
            robust &= correct[name]
        while state["attack"] < len(params.attacks):
            name = params.attacks[state["attack"]]
            survivors = np.array(state["survivors"], np.int64)
            start = state["chunk"] * batch_size
            if start < len(survivors):
                ids = survivors[start:start + batch_size]
                ok = attack[name](tf.constant(x[ids]), tf.constant(y[ids]), tf.constant(ids),
                                  seed).numpy()
                correct[name][ids] = ok
                robust[ids] &= ok
                state["chunk"] += 1
            else:  # the attack is done: the next one runs on what it left robust
                state["attack"] += 1
                state["chunk"] = 0
                state["survivors"] = np.flatnonzero(robust).tolist()
            state["correct"] = {k: v.tolist() for k, v in correct.items()}
            if on_chunk is not None:
                on_chunk(state)
        return {"clean": np.array(state["clean"], bool), **correct, "robust": robust}

    return run
