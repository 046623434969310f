"""Sanity checks against gradient masking, per column, through the column's own forward.

Checks in the spirit of Carlini et al., "On Evaluating Adversarial Robustness" (2019), that
fit a fixed budget: accuracy must fall to zero as epsilon grows to the whole pixel box, more
steps and restarts must not help by more than chance, a white-box attack must not lose to a
transfer, and population statistics must not depend on the evaluation batch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from madry_ns.evaluate.rows import ROW, column_parts
from madry_ns.evaluate.suite import Settings, Suite, batches, column_short, pgd_accuracy


def noise_margin(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy p over n images, plus one image: the
    difference two evaluations of the same model may show by chance."""
    return 2.0 * math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1)) + 1.0 / max(n, 1)


class Parts:
    """The per-image outcomes of the checks' attacks, by name, so that a run stopped during
    the checks (the BN+Shaping column's can take hours) resumes after its last finished
    attack: `done` holds what an earlier run of the same settings made (`--resume`), and
    `on_part(name, outcomes)` is told of each new one as soon as it is made."""

    def __init__(self, done: dict | None = None, on_part=None):
        self.done, self.on_part = dict(done or {}), on_part

    def measure(self, name: str, attack) -> np.ndarray:
        """`attack()`'s per-image outcomes, or the earlier run's under `name`."""
        if name not in self.done:
            self.done[name] = np.asarray(attack(), dtype=bool)
            if self.on_part is not None:
                self.on_part(name, self.done[name])
        return self.done[name]


def sanity_checks(suite: Suite, dataset, config, settings: Settings, result: dict,
                  correct: dict, out=print, parts: Parts | None = None) -> dict:
    """Gradient-masking checks per column, through the column's own forward (adaptive PGD):

    * `large_epsilon`: accuracy at eps 2x, 4x and 255 (the whole box); flagged unless it falls
      below 5% at 255;
    * `more_steps`: PGD with `sanity_step_factor` x the steps and `sanity_restarts` random
      restarts (per image worst case); flagged if accuracy rises above the config's PGD by
      more than `noise_margin`;
    * `white_box_vs_transfer`: flagged if a bounded transfer row at the same epsilon beats the
      adaptive PGD by more than the noise margin;
    * `batch_size`: clean and adaptive-PGD accuracy at half, the same and twice the
      evaluation batch (where the data and the shaped split allow); flagged for PN only
      (which must not depend on it); for BN and BN+Shaping the dependence is reported.

    On random paths (RNA) the checks run in the attack's-path columns (`Suite.sanity_columns`),
    where attack and judgement share one path, so that path randomness is not read as
    masking; the batch-size dependence is reported only (each batch has its own path).

    `parts` (a `Parts`) keeps each attack's per-image outcomes for a resumed run.
    """
    parts = parts or Parts()
    test_batches = batches(dataset, config)
    n = sum(len(y) for _, y in test_batches)
    modes, eps = suite.sanity_columns, config.epsilon
    checks, flags = {}, []
    for m in modes:
        name = column_short(config, m)
        base = correct.get(("adaptive", m))
        base = base if base is not None else parts.measure(
            f"{m}-adaptive", lambda: pgd_accuracy(suite, test_batches, m))
        base_acc = float(base.mean())
        entry = {"adaptive_pgd": base_acc}
        curve = {}
        for factor, e in (("2x", 2 * eps), ("4x", 4 * eps), ("255", 255.0)):
            e = min(e, 255.0)
            step = max(config.step_size, 2.5 * e / config.num_steps)
            curve[factor] = float(parts.measure(
                f"{m}-eps{factor}", lambda: pgd_accuracy(suite, test_batches, m, epsilon=e,
                                                         step_size=step)).mean())
        entry["large_epsilon"] = {"accuracy": curve, "flag": curve["255"] > 0.05}
        if entry["large_epsilon"]["flag"]:
            flags.append(f"{name}: accuracy stays at {100 * curve['255']:.2f}% with eps 255 "
                         f"(the whole pixel box): the gradient does not lead the attack")
        steps = config.num_steps * settings.sanity_step_factor
        strong = parts.measure(f"{m}-steps{steps}-start0",
                               lambda: pgd_accuracy(suite, test_batches, m, num_steps=steps))
        for r in range(1, settings.sanity_restarts + 1):
            strong = strong & parts.measure(
                f"{m}-steps{steps}-start{r}",
                lambda: pgd_accuracy(suite, test_batches, m, num_steps=steps, restart=r))
        strong_acc = float(strong.mean())
        margin = noise_margin(base_acc, n)
        entry["more_steps"] = {"accuracy": strong_acc, "num_steps": steps,
                               "restarts": settings.sanity_restarts + 1,
                               "noise_margin": margin,
                               "flag": strong_acc > base_acc + margin}
        if entry["more_steps"]["flag"]:
            flags.append(f"{name}: PGD-{steps} with restarts gives {100 * strong_acc:.2f}%, "
                         f"more than PGD-{config.num_steps}'s {100 * base_acc:.2f}%")
        transfers = {k: float(correct[(k, m)].mean()) for k in settings.attacks
                     if (k, m) in correct and ROW[k].is_transfer_in(m)
                     and ROW[k].budget(config, settings) == eps}
        if transfers:
            best = min(transfers, key=transfers.get)
            flag = transfers[best] < base_acc - margin
            entry["white_box_vs_transfer"] = {"adaptive": base_acc, "transfer": transfers,
                                              "flag": flag}
            if flag:
                flags.append(f"{name}: the transfer attack '{best}' ({100 * transfers[best]:.2f}"
                             f"%) is stronger than adaptive PGD ({100 * base_acc:.2f}%)")
        entry["batch_size"] = _batch_size_dependence(suite, dataset, config, settings, m,
                                                     clean=result["clean"][m], adaptive=base_acc,
                                                     parts=parts)
        spread = entry["batch_size"]["spread"]
        entry["batch_size"]["flag"] = m == "population" and spread > margin
        if entry["batch_size"]["flag"]:
            flags.append(f"PN: accuracy moves by {100 * spread:.2f} points with the batch size")
        checks[m] = entry
        out(f"sanity {name}: eps 255 -> {100 * curve['255']:.2f}%, PGD-{steps} x "
            f"{settings.sanity_restarts + 1} starts {100 * strong_acc:.2f}% (vs "
            f"{100 * base_acc:.2f}%), batch-size spread {100 * spread:.2f} points")
    return {"checks": checks, "flags": flags}


def _batch_size_dependence(suite: Suite, dataset, config, settings: Settings, mode: str, *,
                           clean: float, adaptive: float, parts: Parts):
    """Clean and adaptive-PGD accuracy at several evaluation batch sizes (a fresh Suite for
    each, since the shaped split depends on the batch); `clean` and `adaptive` are the
    numbers already measured at the evaluation batch size."""
    b = config.eval_batch_size
    step = config.inference_ratio + 1 if mode == "shaped" and \
        config.inference_mixing == "per_batch" else 1
    sizes = sorted({s for s in (b // 2, b, 2 * b)
                    if s >= step and s % step == 0 and s <= max(config.num_eval_examples, b)})
    per_size = {}
    for size in sizes:
        if size == b:
            per_size[str(size)] = {"clean": clean, "adaptive_pgd": adaptive}
            continue
        sized = config.replace(eval_batch_size=size)
        other = Suite(suite.model, sized, dataset,
                      dataclasses.replace(settings, modes=(column_parts(mode)[0],)))
        sized_batches = batches(dataset, sized)
        y = np.concatenate([y for _, y in sized_batches])
        labels = np.concatenate([other.classify(mode, x, i)
                                 for i, (x, _) in enumerate(sized_batches)])
        adv = parts.measure(f"{mode}-batch{size}",
                            lambda: pgd_accuracy(other, sized_batches, mode))
        per_size[str(size)] = {"clean": float((labels == y).mean()),
                               "adaptive_pgd": float(adv.mean())}
    values = [v["adaptive_pgd"] for v in per_size.values()]
    return {"accuracy": per_size, "spread": max(values) - min(values)}

