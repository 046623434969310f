"""The evaluation suite: every attack of the norm-shaping paper under every inference mode.

    python -m madry_ns.evaluate --config CONFIG [--checkpoint PATH] [--attacks ...] [--modes ...]
    python -m madry_ns.evaluate ablation --config CONFIG --checkpoints A B ... --labels ...
    python -m madry_ns.evaluate compare OUTPUT_DIR_A OUTPUT_DIR_B [--names A B]

A robustness number for a defense that depends on batch statistics is only as good as the
strongest attack that knows how the defense works. The first command lays out the paper's
Tables I/II for one checkpoint (rows: attacks; columns: BN, PN and BN+Shaping inference;
clean accuracy first) and puts the attacks that know the defense in the same table:

* transfer rows, generated once against population statistics (PN) and then classified under
  every column, as the paper did (FGSM at the config's epsilon and at 16, PGD and MIM through
  CleverHans 4, CW-L2, DeepFool); in the PN column they are white-box;
* the shaping attack: PGD through batch statistics with 3 clean test images per attacked one
  (each batch split into 4 groups, each attacked with the other 3 as its clean company);
* adaptive rows, generated through each column's own forward: PGD (for BN+Shaping with the
  very reference images the defense uses for that batch: the exact adaptive attack), PGD with
  the attacker's own reference draw (the paper's "slightly weaker" one), EOT-PGD over K
  reference draws, and an AutoAttack-style ensemble (APGD-CE, APGD-T, Square) on fixed
  batches.

Under each table: the per-image worst case over the attacks within the config's L-inf budget,
the time each attack took, and sanity checks against gradient masking (accuracy at a huge
epsilon, more steps and restarts, white-box vs transfer, dependence on the evaluation batch
size), each flagged when it fails. Everything is seeded: a rerun repeats itself.

The second command is the paper's Table IV: checkpoints (one per training ratio) under the
inference ratios 1:0 ... 1:49, with PGD generated on PN (the paper's protocol) beside the
exact adaptive PGD through the shaped forward, as Markdown, JSON and a PNG heat map.

The third compares two finished suites on the same images image by image: per column, how
many images each model keeps under its worst case that the other loses, with the exact sign
test of that split (two accuracies on the same 100 images are not independent samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Callable

import numpy as np

from madry_ns import config as config_lib
from madry_ns.errors import ConfigError

MODES = ("bn", "pn", "shaped")
ABLATION_RATIOS = (0, 1, 3, 9, 19, 49)
# Seed streams: the defense's reference draw for batch i is (inference_seed, i); the
# attacker's own draw (inference_seed, _OTHER + i); attack random starts (seed, row, i).
_OTHER = 1_000_000_000
_INT_SETTINGS = ("eot_samples", "cw_steps", "cw_search_steps", "deepfool_iters", "apgd_steps",
                 "apgd_targets", "square_queries", "shaping_groups", "sanity_step_factor",
                 "sanity_restarts")


@dataclasses.dataclass(frozen=True)
class Row:
    """One attack row: how its examples are generated and which threat model bounds them."""

    key: str
    name: str
    generation: str  # 'pn', 'shaping' or 'own' (through each column's own forward)
    modes: tuple = MODES  # the columns it has a cell in
    norm: str = "linf"  # 'linf' (bounded) or 'l2' (unbounded minimal-perturbation attacks)


ROWS = (
    Row("fgsm", "FGSM", "pn"),
    Row("fgsm16", "FGSM eps 16", "pn"),
    Row("pgd", "PGD (CleverHans)", "pn"),
    Row("mim", "MIM (CleverHans)", "pn"),
    Row("cw", "CW-L2", "pn", norm="l2"),
    Row("deepfool", "DeepFool", "pn", norm="l2"),
    Row("shaping", "shaping attack", "shaping"),
    Row("adaptive", "adaptive PGD", "own"),
    Row("adaptive_other", "adaptive PGD, attacker's own references", "own", ("shaped",)),
    Row("eot", "EOT-PGD over reference draws", "own", ("shaped",)),
    Row("autoattack", "AutoAttack-style (APGD-CE, APGD-T, Square)", "own"),
)
ROW = {row.key: row for row in ROWS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the suite runs besides the config's PGD (epsilon, steps, step size, loss)."""

    attacks: tuple = tuple(ROW)
    modes: tuple = MODES
    fgsm_large_epsilon: float = 16.0
    shaping_groups: int = 4  # 3 clean test images : 1 attacked
    eot_samples: int = 10
    cw_steps: int = 1000
    cw_search_steps: int = 5
    deepfool_iters: int = 50
    apgd_steps: int = 100
    apgd_targets: int = 9
    square_queries: int = 5000
    sanity: bool = True
    sanity_step_factor: int = 5
    sanity_restarts: int = 3

    def __post_init__(self):
        for name, allowed in (("attacks", ROW), ("modes", MODES)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ConfigError(f"--{name} {','.join(values)}: expected a comma-separated "
                                  f"list among {', '.join(allowed)}")
        for name in _INT_SETTINGS:
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ConfigError(f"--{name} {value}: expected a positive integer")
        if self.shaping_groups < 2:
            raise ConfigError(f"--shaping_groups {self.shaping_groups}: the shaping attack "
                              f"needs at least 2 groups (clean company for each attacked one)")
        if not self.fgsm_large_epsilon > 0:
            raise ConfigError(f"--fgsm_large_epsilon {self.fgsm_large_epsilon}: expected a "
                              f"positive number (0-255 scale)")


def check_modes(config, modes) -> None:
    """Raise ConfigError when the config cannot run a column (RNA, shaped batch split)."""
    if config.norm_layer == "rna":
        raise ConfigError("norm_layer 'rna': random-path models are evaluated by "
                          "`python rna_eval.py` (protocols (a)-(d)); this suite is for BN models")
    if "shaped" in modes and config.inference_mixing == "per_batch" and \
            config.eval_batch_size % (config.inference_ratio + 1):
        raise ConfigError(
            f"eval_batch_size {config.eval_batch_size} with inference_ratio "
            f"{config.inference_ratio}: shaped inference per batch needs a batch that splits "
            f"into chunks of 1 + {config.inference_ratio} (a multiple of "
            f"{config.inference_ratio + 1})")


# ------------------------------------------------------------------------------------------
# Labels


def column_label(config, mode: str) -> str:
    """How a column classifies."""
    if mode == "pn":
        return "PN (population statistics)"
    if mode == "bn":
        return f"BN (statistics of each test batch of {config.eval_batch_size})"
    r = config.inference_ratio
    chunk = 1 if config.inference_mixing == "per_sample" else config.eval_batch_size // (r + 1)
    return (f"BN+Shaping 1:{r} ({chunk} test + {r * chunk} clean training images per forward; "
            f"the defense's references for batch i drawn from seed (inference_seed, i))")


def column_short(config, mode: str) -> str:
    return {"pn": "PN", "bn": "BN", "shaped": f"BN+Shaping 1:{config.inference_ratio}"}[mode]


def row_label(config, settings: Settings, key: str) -> str:
    """How a row's examples are generated, in full."""
    eps, k, step = config.epsilon, config.num_steps, config.step_size
    start = ", random start" if config.random_start else ""
    pgd = f"PGD-{k} ({config.loss_func}, eps {eps:g}, step {step:g}{start})"
    labels = {
        "fgsm": f"FGSM eps {eps:g}, generated on PN (transfer; white-box in the PN column)",
        "fgsm16": f"FGSM eps {settings.fgsm_large_epsilon:g}, generated on PN (the paper's "
                  f"FGSM(16))",
        "pgd": f"CleverHans {pgd.replace(config.loss_func + ', ', 'xent, ')}, generated on PN",
        "mim": f"CleverHans MIM-{k} (eps {eps:g}, step {step:g}, decay 1.0), generated on PN",
        "cw": f"CW-L2 ({settings.cw_search_steps} x {settings.cw_steps} steps, unbounded L2), "
              f"generated on PN",
        "deepfool": f"DeepFool ({settings.deepfool_iters} iterations, 10 candidates, overshoot "
                    f"0.02, unbounded L2), generated on PN",
        "shaping": f"shaping attack: {pgd} through batch statistics, each group of 1/"
                   f"{settings.shaping_groups} of the batch attacked beside the other clean "
                   f"test images",
        "adaptive": f"{pgd} through the column's own forward (PN: white-box; BN: the test "
                    f"batch's statistics; BN+Shaping: the very references the defense uses, "
                    f"the exact adaptive attack)",
        "adaptive_other": f"{pgd} through BN+Shaping with the attacker's own reference draw "
                          f"(the paper's 'slightly weaker' adaptive attack)",
        "eot": f"EOT-{pgd} through BN+Shaping, each gradient averaged over "
               f"{settings.eot_samples} reference draws",
        "autoattack": f"APGD-CE and APGD-T ({settings.apgd_steps} steps each; "
                      f"{settings.apgd_targets} target class"
                      f"{'es' if settings.apgd_targets > 1 else ''}), Square "
                      f"({settings.square_queries} queries), eps {eps:g}, through the "
                      f"column's own forward on fixed batches (per image worst case; no FAB-T)",
    }
    return labels[key]


def row_epsilon(config, settings: Settings, key: str) -> float | None:
    """The L-inf budget of a row (None for unbounded L2 attacks)."""
    if ROW[key].norm == "l2":
        return None
    return settings.fgsm_large_epsilon if key == "fgsm16" else config.epsilon


# ------------------------------------------------------------------------------------------
# The forwards and the attacks


class Suite:
    """The compiled forwards and attacks of one model under one config."""

    def __init__(self, model, config, dataset, settings: Settings):
        import tensorflow as tf

        from madry_ns import attacks, autoattack, evaluation

        self.tf, self.model, self.config, self.settings = tf, model, config, settings
        self.shaped = None
        if "shaped" in settings.modes:
            self.shaped = evaluation.make_shaped_inference(
                model, config.replace(inference_references="fresh"), dataset)
        seed0 = tf.constant(config.inference_seed, tf.int64)

        def forward(mode: str, other: bool = False) -> Callable:
            """`fn(x, i, draw=None) -> logits`: the column's forward for batch i; `other`
            uses the attacker's own reference draw, `draw` an explicit seed (EOT)."""
            def fn(x, i, draw=None):
                if mode == "pn":
                    return model(x, bn_mode="population")
                if mode == "bn":
                    return model(x, bn_mode="batch_frozen")
                if draw is None:
                    draw = tf.stack([seed0, i + _OTHER if other else i])
                return self.shaped.logits(x, draw)
            return fn

        self.forward = forward
        self._classify = {m: tf.function(forward(m)) for m in settings.modes}
        self._compiled: dict = {}
        self.attacks, self.autoattack = attacks, autoattack

    def classify(self, mode: str, x, i: int):
        """Predicted labels of x (batch i) under a column."""
        tf = self.tf
        logits = self._classify[mode](tf.convert_to_tensor(x, tf.float32),
                                      tf.constant(i, tf.int64))
        return np.argmax(logits.numpy(), 1)

    def _seed(self, row: int, i):
        tf = self.tf
        return tf.stack([tf.constant(self.config.np_random_seed, tf.int64),
                         tf.constant(row, tf.int64) * 100_003 + i])

    def pgd_through(self, mode: str, *, other=False, epsilon=None, num_steps=None,
                    step_size=None, restart: int = 0):
        """Compiled `fn(x, y, i) -> x_adv`: the config's PGD through a column's forward."""
        c = self.config
        params = dict(epsilon=float(epsilon or c.epsilon), num_steps=int(num_steps or c.num_steps),
                      step_size=float(step_size or c.step_size), random_start=c.random_start)
        key = ("pgd", mode, other, tuple(params.values()), restart)
        if key not in self._compiled:
            fwd = self.forward(mode, other)
            loss = self.attacks.LOSSES[c.loss_func]

            @self.tf.function
            def run(x, y, i):
                return self.attacks.pgd(
                    lambda z: self.tf.reduce_sum(loss(fwd(z, i), y)), x,
                    seed=self._seed(1000 + restart, i), **params)
            self._compiled[key] = run
        return self._compiled[key]

    def generator(self, key: str, mode: str | None) -> Callable:
        """Compiled `fn(x, y, i) -> x_adv` of row `key` (for 'own' rows, through `mode`)."""
        cache = (key, mode)
        if cache in self._compiled:
            return self._compiled[cache]
        tf, c, s, A = self.tf, self.config, self.settings, self.attacks
        pn = self.forward("pn")
        index = list(ROW).index(key)
        if key == "adaptive":
            fn = self.pgd_through(mode)
        elif key == "adaptive_other":
            fn = self.pgd_through(mode, other=True)
        else:
            def attack(x, y, i):
                seed = self._seed(index, i)
                on_pn = lambda z: pn(z, i)  # noqa: E731
                if key == "fgsm":
                    return A.fgsm(on_pn, x, y, epsilon=float(c.epsilon))
                if key == "fgsm16":
                    return A.fgsm(on_pn, x, y, epsilon=float(s.fgsm_large_epsilon))
                if key == "pgd":
                    return A.cleverhans_pgd(on_pn, x, y, epsilon=float(c.epsilon),
                                            num_steps=c.num_steps,
                                            step_size=float(c.step_size),
                                            random_start=c.random_start, seed=seed)
                if key == "mim":
                    return A.mim(on_pn, x, y, epsilon=float(c.epsilon), num_steps=c.num_steps,
                                 step_size=float(c.step_size))
                if key == "cw":
                    return A.carlini_wagner_l2(on_pn, x, y, num_steps=s.cw_steps,
                                               binary_search_steps=s.cw_search_steps)
                if key == "deepfool":
                    return A.deepfool(on_pn, x, y, num_steps=s.deepfool_iters)
                if key == "shaping":
                    return self._shaping_attack(x, y, seed)
                if key == "eot":
                    fwd = self.forward(mode)
                    loss = A.LOSSES[c.loss_func]
                    return A.eot_pgd(
                        lambda z, draw: tf.reduce_sum(loss(fwd(z, i, draw), y)), x,
                        epsilon=c.epsilon, num_steps=c.num_steps, step_size=c.step_size,
                        eot_samples=s.eot_samples, random_start=c.random_start, seed=seed)
                if key == "autoattack":
                    fwd = self.forward(mode)
                    # Judged per attack on its full output batch ("robust"): re-classifying
                    # the per-image mix would put images in a batch no attack produced.
                    result = self.autoattack.autoattack_style(
                        lambda z: fwd(z, i), x, y, epsilon=float(c.epsilon),
                        num_steps=s.apgd_steps, num_targets=s.apgd_targets,
                        square_num_steps=s.square_queries, seed=seed)
                    return result["x_adv"], result["robust"]
                raise AssertionError(key)
            fn = tf.function(attack)
        self._compiled[cache] = fn
        return fn

    def _shaping_attack(self, x, y, seed):
        """Each of `shaping_groups` groups attacked by PGD through batch statistics beside
        the rest of the (clean) batch; the loss is summed over the whole batch (paper Eq. 5).
        The moving statistics are never touched (`batch_frozen`)."""
        tf, c = self.tf, self.config
        n = int(x.shape[0])
        size = -(-n // self.settings.shaping_groups)
        loss = self.attacks.LOSSES[c.loss_func]
        out = []
        for g, lo in enumerate(range(0, n, size)):
            hi = min(lo + size, n)
            x_clean = tf.concat([x[:lo], x[hi:]], 0)
            y_all = tf.concat([y[:lo], y[hi:], y[lo:hi]], 0)

            def loss_fn(z, x_clean=x_clean, y_all=y_all):
                logits = self.model(tf.concat([x_clean, z], 0), bn_mode="batch_frozen")
                return tf.reduce_sum(loss(logits, y_all))

            out.append(self.attacks.pgd(
                loss_fn, x[lo:hi], epsilon=c.epsilon, num_steps=c.num_steps,
                step_size=c.step_size, random_start=c.random_start,
                seed=tf.random.experimental.stateless_fold_in(seed, g)))
        return tf.concat(out, 0)


def noise_margin(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy p over n images, plus one image: the
    difference two evaluations of the same model may show by chance."""
    return 2.0 * math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1)) + 1.0 / max(n, 1)


# ------------------------------------------------------------------------------------------
# The table


def _batches(dataset, config):
    from madry_ns import data

    return list(data.eval_batches(dataset.test_images, dataset.test_labels,
                                  config.num_eval_examples, config.eval_batch_size))


def evaluate(model, dataset, config, settings: Settings = Settings(), out=print,
             on_row: Callable[[dict, dict], None] | None = None,
             previous: dict | None = None) -> dict:
    """Run the suite on the first `num_eval_examples` test images in batches of
    `eval_batch_size`; returns the `results.json` content (without checkpoint details).

    `on_row`, if given, receives the results so far and the per-image arrays (`per_image`)
    after each attack (marked `incomplete`, with the attacks still to run) and once at the
    end, so an evaluation stopped after hours keeps its rows. `previous` (from
    `load_previous`) holds rows of an earlier run with the same settings: those attacks are
    not run again, after checking that the clean predictions are the same image by image."""
    from madry_ns.progress import Progress

    check_modes(config, settings.modes)
    suite = Suite(model, config, dataset, settings)
    batches = _batches(dataset, config)
    y_all = np.concatenate([y for _, y in batches])
    n = len(y_all)
    modes = settings.modes
    correct: dict = {}  # (row, mode) -> [n] bool
    rows, total_start = [], time.perf_counter()

    def classify_all(x_list, mode):
        return np.concatenate([suite.classify(mode, x, i) for i, x in enumerate(x_list)]) == y_all

    clean = {m: classify_all([x for x, _ in batches], m) for m in modes}
    reused = _check_previous(previous, y_all, clean) if previous else {}

    def summary():
        return _summary(config, settings, dataset, modes, n, clean, correct, rows)

    def arrays():
        return per_image(y_all, clean, correct)

    out(f"clean: " + "  ".join(f"{column_short(config, m)} {100 * clean[m].mean():.2f}%"
                               for m in modes))
    for position, key in enumerate(settings.attacks):
        row = ROW[key]
        cols = [m for m in modes if m in row.modes]
        if not cols:
            continue
        if key in reused:  # load_previous kept only rows with every column's outcomes
            rows.append(reused[key])
            correct.update({(key, m): previous["correct"][(key, m)] for m in cols})
            out(_row_line(config, key, reused[key]["accuracy"], "from --resume"))
            continue
        start = time.perf_counter()
        bar = Progress(len(batches) * (len(cols) if row.generation == "own" else 1), key)
        cells, distances = {}, []
        generations = cols if row.generation == "own" else [None]
        for gen in generations:
            fn = suite.generator(key, gen)
            x_adv, robust = [], []
            for i, (x, y) in enumerate(batches):
                tf = suite.tf
                adv = fn(tf.constant(x), tf.constant(y, tf.int64), tf.constant(i, tf.int64))
                if key == "autoattack":
                    adv, hit = adv
                    robust.append(hit.numpy())
                x_adv.append(adv.numpy())
                bar.update()
            d = np.concatenate([a - x for a, (x, _) in zip(x_adv, batches)]).reshape(n, -1)
            l2 = np.sqrt((d ** 2).sum(1))
            # CW returns the clean image where it found nothing: the median over all images
            # would then read 0, so the perturbed images are counted apart.
            moved = l2 > 0
            distances.append({"linf_max": float(np.abs(d).max()),
                              "l2_median": float(np.median(l2)),
                              "perturbed": float(moved.mean()),
                              "l2_median_perturbed": float(np.median(l2[moved]))
                              if moved.any() else None,
                              "pixel_min": float(min(a.min() for a in x_adv)),
                              "pixel_max": float(max(a.max() for a in x_adv))})
            for m in (cols if gen is None else [gen]):
                correct[(key, m)] = np.concatenate(robust) if robust else classify_all(x_adv, m)
                cells[m] = float(correct[(key, m)].mean())
        bar.close()
        seconds = time.perf_counter() - start
        rows.append({"key": key, "attack": row.name, "generation": row_label(config, settings, key),
                     "threat_model": row.norm,
                     "epsilon": row_epsilon(config, settings, key),
                     "accuracy": cells, "perturbation": distances[0] if len(distances) == 1
                     else dict(zip(cols, distances)), "seconds": round(seconds, 2)})
        out(_row_line(config, key, cells, f"{seconds:.1f} s"))
        pending = list(settings.attacks[position + 1:])
        if on_row is not None and pending:
            on_row({**summary(), "incomplete": {"pending_attacks": pending,
                                                "sanity_pending": settings.sanity}}, arrays())

    result = summary()
    if reused:
        result["resumed_rows"] = [r["key"] for r in rows if r["key"] in reused]
    if settings.sanity:
        if previous and previous.get("sanity") and not reused.keys() ^ {
                r["key"] for r in rows}:
            result["sanity"] = previous["sanity"]  # made from these very rows
            out("sanity checks: from --resume")
        else:
            if on_row is not None:
                on_row({**result, "incomplete": {"pending_attacks": [],
                                                 "sanity_pending": True}}, arrays())
            result["sanity"] = sanity_checks(suite, dataset, config, settings, result,
                                             correct, out=out)
    result["seconds"] = round(time.perf_counter() - total_start, 2)
    if on_row is not None:
        on_row(result, arrays())
    return result


def _row_line(config, key: str, cells: dict, note: str) -> str:
    """The console line of one finished (or carried-over) row."""
    return f"{key}: " + "  ".join(f"{column_short(config, m)} {100 * v:.2f}%"
                                  for m, v in cells.items()) + f"   ({note})"


def per_image(labels, clean: dict, correct: dict) -> dict:
    """The per-image outcomes as flat arrays for `per_image.npz`: `labels`, `clean__MODE`
    and `ROW__MODE` (True where the image is classified correctly)."""
    arrays = {"labels": np.asarray(labels, np.int64)}
    arrays.update({f"clean__{m}": np.asarray(v, bool) for m, v in clean.items()})
    arrays.update({f"{k}__{m}": np.asarray(v, bool) for (k, m), v in correct.items()})
    return arrays


# The settings that must match for --resume to reuse a row (the attack list and the sanity
# switch may change: rows are reused by key, and the sanity checks rerun unless identical).
_RESUME_IGNORED = ("attacks", "sanity")


def _read_suite(output_dir: str, who: str) -> tuple | None:
    """(results.json, per_image.npz arrays, path of results.json) of a suite's output folder,
    or None when it has no results.json; unreadable or missing per-image files are a
    ConfigError that starts with `who` (the option or command that needed them)."""
    path = os.path.join(output_dir, "results.json")
    arrays_path = os.path.join(output_dir, "per_image.npz")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{who}: cannot read {path}: {e}") from None
    if not os.path.exists(arrays_path):
        raise ConfigError(f"{who}: {path} has no per_image.npz beside it (written by an "
                          f"older version), so its per-image outcomes are unknown; run the "
                          f"suite again into another --output")
    try:
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{who}: cannot read {arrays_path}: {e}") from None
    return saved, arrays, path


def load_previous(output_dir: str, expected: dict) -> dict | None:
    """Rows of an earlier run in `output_dir` (results.json and per_image.npz) for --resume,
    or None when there is none. `expected` holds this run's `checkpoint`, `num_examples`,
    `dataset`, `model`, `columns` and `settings`; any difference is a ConfigError naming it,
    since reusing rows made under other settings would mix two experiments in one table."""
    expected = json.loads(json.dumps(expected))  # tuples as lists, as results.json has them
    found = _read_suite(output_dir, "--resume")
    if found is None:
        return None
    saved, arrays, path = found
    for key in ("checkpoint", "num_examples", "dataset", "model", "columns"):
        if saved.get(key) != expected[key]:
            raise ConfigError(f"--resume: {path} has {key} {saved.get(key)!r}, this run "
                              f"{expected[key]!r}; use another --output or drop --resume")
    for key, value in expected["settings"].items():
        if key not in _RESUME_IGNORED and saved.get("settings", {}).get(key) != value:
            raise ConfigError(f"--resume: {path} was made with {key} "
                              f"{saved.get('settings', {}).get(key)!r}, this run {value!r}; "
                              f"use another --output or drop --resume")
    correct = {}
    for name, value in arrays.items():
        if "__" in name and not name.startswith("clean__"):
            key, mode = name.split("__", 1)
            correct[(key, mode)] = value
    rows = {r["key"]: r for r in saved.get("rows", [])
            if all((r["key"], m) in correct for m in r["accuracy"])}
    return {"rows": rows, "correct": correct, "labels": arrays.get("labels"),
            "clean": {k.split("__", 1)[1]: v for k, v in arrays.items()
                      if k.startswith("clean__")},
            "sanity": None if "incomplete" in saved else saved.get("sanity"),
            "saved": saved, "path": path}


def _already_done(previous: dict, settings: Settings) -> bool:
    """Whether `previous` is a finished run with exactly this run's rows (and its sanity checks
    when asked for): then --resume has nothing to add and rewriting the files would only
    relabel a finished table as carried over."""
    wanted = [k for k in settings.attacks if any(m in ROW[k].modes for m in settings.modes)]
    saved = previous["saved"]
    return ("incomplete" not in saved and [r["key"] for r in saved.get("rows", [])]
            == wanted and set(wanted) <= previous["rows"].keys()
            and bool(previous["sanity"]) == settings.sanity)


def _check_previous(previous: dict, labels, clean: dict) -> dict:
    """The reusable rows of `previous`, after checking that this run sees the same images
    and classifies them the same way (else the model, data or code changed)."""
    if previous["labels"] is None or not np.array_equal(previous["labels"], labels):
        raise ConfigError(f"--resume: the labels in {previous['path']}'s per_image.npz are not "
                          f"those of this run's test images; drop --resume")
    for m, v in clean.items():
        if m not in previous["clean"] or not np.array_equal(previous["clean"][m], v):
            raise ConfigError(f"--resume: the clean predictions under {m} differ from those "
                              f"in {previous['path']}: the model, data or code changed; "
                              f"drop --resume")
    return previous["rows"]


def _worst_case(config, settings: Settings, modes, clean: dict, correct: dict) -> dict:
    """Per column: an image counts as robust only if it is right clean and under every L-inf
    attack within the config's epsilon that has run."""
    worst = {}
    for m in modes:
        within = [k for k in settings.attacks if (k, m) in correct and
                  row_epsilon(config, settings, k) is not None and
                  row_epsilon(config, settings, k) <= config.epsilon]
        robust = clean[m].copy()
        for k in within:
            robust &= correct[(k, m)]
        single = {k: float(correct[(k, m)].mean()) for k in within}
        worst[m] = {"per_image": float(robust.mean()), "attacks": within,
                    "weakest_single_attack": min(single, key=single.get) if single else None,
                    "single_min": min(single.values()) if single else None}
    return worst


def _summary(config, settings: Settings, dataset, modes, n, clean, correct, rows) -> dict:
    return {
        **_identity(config, settings, dataset, n),
        "clean": {m: float(clean[m].mean()) for m in modes},
        "rows": list(rows), "worst_case": _worst_case(config, settings, modes, clean, correct),
    }


def _identity(config, settings: Settings, dataset, n: int) -> dict:
    """What makes two evaluations the same experiment (compared by --resume)."""
    return {
        "num_examples": n, "model": config.model, "dataset": dataset.source,
        "columns": {m: column_label(config, m) for m in settings.modes},
        "settings": {**dataclasses.asdict(settings), "epsilon": config.epsilon,
                     "num_steps": config.num_steps, "step_size": config.step_size,
                     "random_start": config.random_start, "loss_func": config.loss_func,
                     "eval_batch_size": config.eval_batch_size,
                     "inference_ratio": config.inference_ratio,
                     "inference_mixing": config.inference_mixing,
                     "inference_seed": config.inference_seed,
                     "np_random_seed": config.np_random_seed},
    }


# ------------------------------------------------------------------------------------------
# Sanity checks against gradient masking


def _pgd_accuracy(suite: Suite, batches, mode: str, **params) -> np.ndarray:
    """Per image: classified correctly by `mode` after the config's PGD through it."""
    fn = suite.pgd_through(mode, **params)
    tf = suite.tf
    hits = []
    for i, (x, y) in enumerate(batches):
        adv = fn(tf.constant(x), tf.constant(y, tf.int64), tf.constant(i, tf.int64))
        hits.append(suite.classify(mode, adv, i) == y)
    return np.concatenate(hits)


def sanity_checks(suite: Suite, dataset, config, settings: Settings, result: dict,
                  correct: dict, out=print) -> dict:
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
    """
    batches = _batches(dataset, config)
    n = sum(len(y) for _, y in batches)
    modes, eps = settings.modes, config.epsilon
    checks, flags = {}, []
    for m in modes:
        name = column_short(config, m)
        base = correct.get(("adaptive", m))
        base = base if base is not None else _pgd_accuracy(suite, batches, m)
        base_acc = float(base.mean())
        entry = {"adaptive_pgd": base_acc}
        curve = {}
        for factor, e in (("2x", 2 * eps), ("4x", 4 * eps), ("255", 255.0)):
            e = min(e, 255.0)
            step = max(config.step_size, 2.5 * e / config.num_steps)
            curve[factor] = float(_pgd_accuracy(suite, batches, m, epsilon=e,
                                                step_size=step).mean())
        entry["large_epsilon"] = {"accuracy": curve, "flag": curve["255"] > 0.05}
        if entry["large_epsilon"]["flag"]:
            flags.append(f"{name}: accuracy stays at {100 * curve['255']:.2f}% with eps 255 "
                         f"(the whole pixel box): the gradient does not lead the attack")
        steps = config.num_steps * settings.sanity_step_factor
        strong = _pgd_accuracy(suite, batches, m, num_steps=steps)
        for r in range(1, settings.sanity_restarts + 1):
            strong &= _pgd_accuracy(suite, batches, m, num_steps=steps, restart=r)
        strong_acc = float(strong.mean())
        margin = noise_margin(base_acc, n)
        entry["more_steps"] = {"accuracy": strong_acc, "num_steps": steps,
                               "restarts": settings.sanity_restarts + 1,
                               "noise_margin": margin,
                               "flag": strong_acc > base_acc + margin}
        if entry["more_steps"]["flag"]:
            flags.append(f"{name}: PGD-{steps} with restarts gives {100 * strong_acc:.2f}%, "
                         f"more than PGD-{config.num_steps}'s {100 * base_acc:.2f}%")
        transfers = {k: float(correct[(k, m)].mean()) for k in ("fgsm", "pgd", "mim", "shaping")
                     if (k, m) in correct and (m != "pn" or k == "shaping")}
        if transfers:
            best = min(transfers, key=transfers.get)
            flag = transfers[best] < base_acc - margin
            entry["white_box_vs_transfer"] = {"adaptive": base_acc, "transfer": transfers,
                                              "flag": flag}
            if flag:
                flags.append(f"{name}: the transfer attack '{best}' ({100 * transfers[best]:.2f}"
                             f"%) is stronger than adaptive PGD ({100 * base_acc:.2f}%)")
        entry["batch_size"] = _batch_size_dependence(suite, dataset, config, settings, m,
                                                     clean=result["clean"][m], adaptive=base_acc)
        spread = entry["batch_size"]["spread"]
        entry["batch_size"]["flag"] = m == "pn" and spread > margin
        if entry["batch_size"]["flag"]:
            flags.append(f"PN: accuracy moves by {100 * spread:.2f} points with the batch size")
        checks[m] = entry
        out(f"sanity {name}: eps 255 -> {100 * curve['255']:.2f}%, PGD-{steps} x "
            f"{settings.sanity_restarts + 1} starts {100 * strong_acc:.2f}% (vs "
            f"{100 * base_acc:.2f}%), batch-size spread {100 * spread:.2f} points")
    return {"checks": checks, "flags": flags}


def _batch_size_dependence(suite: Suite, dataset, config, settings: Settings, mode: str, *,
                           clean: float, adaptive: float):
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
        other = Suite(suite.model, sized, dataset, dataclasses.replace(settings, modes=(mode,)))
        batches = _batches(dataset, sized)
        y = np.concatenate([y for _, y in batches])
        labels = np.concatenate([other.classify(mode, x, i) for i, (x, _) in enumerate(batches)])
        adv = _pgd_accuracy(other, batches, mode)
        per_size[str(size)] = {"clean": float((labels == y).mean()),
                               "adaptive_pgd": float(adv.mean())}
    values = [v["adaptive_pgd"] for v in per_size.values()]
    return {"accuracy": per_size, "spread": max(values) - min(values)}


# ------------------------------------------------------------------------------------------
# Writing the results


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(result: dict) -> str:
    """results.md: the paper's Table I/II layout with honest labels and the sanity flags."""
    modes = list(result["columns"])
    short = {m: result["columns"][m].split(" (")[0] for m in modes}
    lines = [f"# Evaluation: {result.get('checkpoint', 'model')}", ""]
    if "checkpoint" in result:
        lines += [f"Step {result['step']}, first {result['num_examples']} test images of "
                  f"{result['dataset']}, made by `{result['command']}` on {result['time']}.", ""]
    if result.get("resumed_rows"):
        lines += [f"Rows carried over from an earlier run of the same checkpoint and "
                  f"settings (`--resume`, clean predictions checked image by image): "
                  f"{', '.join(result['resumed_rows'])}.", ""]
    if "incomplete" in result:
        todo = result["incomplete"]["pending_attacks"] + (
            ["the sanity checks"] if result["incomplete"]["sanity_pending"] else [])
        lines += [f"**Incomplete**: the evaluation is still running or was stopped; still to "
                  f"run: {', '.join(todo)}. The worst case covers only the rows below.", ""]
    lines += ["Accuracy (%) of each attack's examples under each inference mode (columns).",
              "", "| attack | " + " | ".join(short[m] for m in modes) + " | seconds |",
              "|---|" + "---|" * (len(modes) + 1),
              "| clean | " + " | ".join(_pct(result["clean"][m]) for m in modes) + " | |"]
    for row in result["rows"]:
        lines.append(f"| {row['attack']} | " + " | ".join(
            _pct(row["accuracy"].get(m)) for m in modes) + f" | {row['seconds']:.1f} |")
    worst = result["worst_case"]
    lines.append("| **worst case per image (L-inf attacks within eps)** | " + " | ".join(
        f"**{_pct(worst[m]['per_image'])}**" for m in modes) + " | |")
    lines += ["", "Columns (how each image is classified):", ""]
    lines += [f"* **{short[m]}**: {result['columns'][m]}" for m in modes]
    lines += ["", "Rows (how each attack's examples are made):", ""]
    for row in result["rows"]:
        p = row["perturbation"]
        dist = p if "linf_max" in p else next(iter(p.values()))
        size = f"median L2 {dist['l2_median']:.2f}"
        if dist.get("perturbed", 1.0) < 1.0:  # CW leaves images it could not attack clean
            size = (f"{100 * dist['perturbed']:.1f}% of the images perturbed, median L2 of "
                    f"those {dist['l2_median_perturbed'] or 0:.2f}")
        lines.append(f"* **{row['attack']}**: {row['generation']}. Largest L-inf "
                     f"{dist['linf_max']:.2f}, {size} (0-255 scale).")
    lines += ["", "The worst case counts an image as robust only if it is classified correctly "
              "clean and under every L-inf attack of the column within the config's epsilon "
              f"({result['settings']['epsilon']:g}); CW-L2 and DeepFool (unbounded L2) and FGSM "
              "at a larger epsilon are other threat models and stay out of it.", ""]
    if "sanity" in result:
        lines += _sanity_markdown(result, short)
    return "\n".join(lines) + "\n"


def _sanity_markdown(result: dict, short: dict) -> list:
    sanity = result["sanity"]
    lines = ["## Sanity checks against gradient masking", ""]
    if sanity["flags"]:
        lines += ["**FLAGGED:**", ""] + [f"* {f}" for f in sanity["flags"]] + [""]
    else:
        lines += ["No check flagged.", ""]
    lines += ["| check | " + " | ".join(short[m] for m in sanity["checks"]) + " |",
              "|---|" + "---|" * len(sanity["checks"])]
    checks = sanity["checks"]

    def mark(entry):
        return " (FLAG)" if entry.get("flag") else ""

    def cells(fn):
        return " | ".join(fn(c) for c in checks.values())

    lines.append("| adaptive PGD | " + cells(lambda c: _pct(c["adaptive_pgd"])) + " |")
    for eps in ("2x", "4x", "255"):
        lines.append(f"| adaptive PGD, eps {eps} | " + cells(
            lambda c: _pct(c["large_epsilon"]["accuracy"][eps]) +
            (mark(c["large_epsilon"]) if eps == "255" else "")) + " |")
    some = next(iter(checks.values()))["more_steps"]
    lines.append(f"| PGD-{some['num_steps']}, {some['restarts']} starts | " + cells(
        lambda c: _pct(c["more_steps"]["accuracy"]) + mark(c["more_steps"])) + " |")
    lines.append("| strongest transfer row | " + cells(
        lambda c: (_pct(min(c["white_box_vs_transfer"]["transfer"].values())) +
                   mark(c["white_box_vs_transfer"])) if "white_box_vs_transfer" in c else "-")
        + " |")
    lines.append("| adaptive PGD by eval batch size | " + cells(
        lambda c: ", ".join(f"{s}: {_pct(v['adaptive_pgd'])}"
                            for s, v in c["batch_size"]["accuracy"].items()) +
        mark(c["batch_size"])) + " |")
    lines += ["", "Flags: accuracy above 5% at eps 255; more steps and restarts raising accuracy "
              "by more than two binomial standard errors plus one image; a transfer attack "
              "beating the adaptive one by that margin; PN accuracy moving with the batch size "
              "by that margin (BN and BN+Shaping depend on the batch by design: reported only).",
              ""]
    return lines


def write_results(result: dict, output_dir: str, arrays: dict | None = None) -> None:
    """results.json and results.md (and per_image.npz when `arrays` are given, first, so
    that every row in results.json has its per-image outcomes), each written atomically."""
    from madry_ns import files

    os.makedirs(output_dir, exist_ok=True)
    if arrays is not None:
        with files.atomic_open(os.path.join(output_dir, "per_image.npz"), "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write_text(os.path.join(output_dir, "results.json"),
                            json.dumps(result, indent=2) + "\n")
    files.atomic_write_text(os.path.join(output_dir, "results.md"), markdown(result))


def _load(config, path: str | None):
    from madry_ns import checkpoints
    from madry_ns.challenge import load_checkpoint_model

    path = path or checkpoints.latest_checkpoint(config.model_dir)
    if path is None:
        raise checkpoints.CheckpointError(
            f"no checkpoint in model_dir '{config.model_dir}' to evaluate")
    path = checkpoints.resolve(path)
    return path, load_checkpoint_model(config, path)


def run(config, settings: Settings, checkpoint: str | None = None,
        output: str | None = None, command: str = "", out=print,
        resume: bool = False) -> dict:
    """Evaluate a checkpoint (default: the latest in model_dir) and write the results;
    with `resume`, rows already in `output` (same checkpoint and settings) are kept."""
    from madry_ns import checkpoints, data

    check_modes(config, settings.modes)
    dataset = data.load_dataset(config)
    path, model = _load(config, checkpoint)
    step = checkpoints.checkpoint_step(path)
    output = output or os.path.join(config.model_dir, "eval", f"suite-{step}")
    previous = None
    if resume:
        n = sum(len(y) for _, y in _batches(dataset, config))
        previous = load_previous(output, {**_identity(config, settings, dataset, n),
                                          "checkpoint": path})
        out(f"--resume: {len(previous['rows'])} rows from {previous['path']}" if previous
            else f"--resume: nothing in {output} yet, starting afresh")
        if previous and _already_done(previous, settings):
            out(f"--resume: {output} already holds every row asked for"
                f"{' and the sanity checks' if settings.sanity else ''}; nothing to run, "
                f"its files are left as they are")
            return previous["saved"]
    out(f"checkpoint {path} (step {step}), first {config.num_eval_examples} test images of "
        f"{dataset.source}")
    header = {"checkpoint": path, "step": step, "command": command,
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    result = {**header, **evaluate(
        model, dataset, config, settings, out=out, previous=previous,
        on_row=lambda partial, arrays: write_results({**header, **partial}, output, arrays))}
    out(markdown(result))
    out(f"wrote {output}/results.md and results.json")
    return result


# ------------------------------------------------------------------------------------------
# The ablation (Table IV)


def ablation(config, paths: list, labels: list, ratios=ABLATION_RATIOS, out=print) -> dict:
    """Each checkpoint under BN+Shaping at each inference ratio: clean accuracy, PGD generated
    on PN (the paper's Table IV) and the exact adaptive PGD through the shaped forward."""
    from madry_ns import data

    if len(paths) != len(labels):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints; "
                          f"give one per checkpoint")
    for r in ratios:
        if r < 0 or config.eval_batch_size % (r + 1):
            raise ConfigError(f"--ratios {r}: eval_batch_size {config.eval_batch_size} must "
                              f"split into chunks of 1 + {r}")
    dataset = data.load_dataset(config)
    grid = {"clean": {}, "transfer": {}, "adaptive": {}}
    for label, path in zip(labels, paths):
        _, model = _load(config, path)
        for g in grid.values():
            g[label] = {}
        pn_examples = None  # generated on PN: the same for every inference ratio
        for r in ratios:
            start = time.perf_counter()
            c = config.replace(inference_bn="shaped", inference_ratio=r,
                               inference_mixing="per_batch")
            settings = Settings(attacks=("pgd", "adaptive"), modes=("shaped",), sanity=False)
            suite = Suite(model, c, dataset, settings)
            batches = _batches(dataset, c)
            y = np.concatenate([b[1] for b in batches])
            tf = suite.tf
            if pn_examples is None:
                generate = suite.generator("pgd", None)
                pn_examples = [generate(tf.constant(x), tf.constant(yb, tf.int64),
                                        tf.constant(i, tf.int64)).numpy()
                               for i, (x, yb) in enumerate(batches)]
            clean, transfer = [], []
            for i, ((x, _), adv) in enumerate(zip(batches, pn_examples)):
                clean.append(suite.classify("shaped", x, i))
                transfer.append(suite.classify("shaped", adv, i))
            grid["clean"][label][str(r)] = float((np.concatenate(clean) == y).mean())
            grid["transfer"][label][str(r)] = float((np.concatenate(transfer) == y).mean())
            grid["adaptive"][label][str(r)] = float(_pgd_accuracy(suite, batches,
                                                                  "shaped").mean())
            out(f"{label} 1:{r}: clean {_pct(grid['clean'][label][str(r)])}  PN-generated PGD "
                f"{_pct(grid['transfer'][label][str(r)])}  adaptive PGD "
                f"{_pct(grid['adaptive'][label][str(r)])}  ({time.perf_counter() - start:.1f} s)")
    return {"checkpoints": dict(zip(labels, paths)), "ratios": list(ratios),
            "num_examples": config.num_eval_examples, "dataset": dataset.source,
            "eval_batch_size": config.eval_batch_size, "epsilon": config.epsilon,
            "num_steps": config.num_steps, "step_size": config.step_size, "grid": grid}


_GRID_TITLES = {"clean": "clean accuracy",
                "transfer": "PGD generated on PN, classified BN+Shaping (the paper's Table IV)",
                "adaptive": "exact adaptive PGD through BN+Shaping (the defense's references)"}


def ablation_markdown(result: dict, command: str = "") -> str:
    ratios = result["ratios"]
    lines = ["# Ablation: training ratio x inference ratio (paper Table IV layout)", ""]
    if command:
        lines += [f"Made by `{command}`: first {result['num_examples']} test images of "
                  f"{result['dataset']}, eval batch {result['eval_batch_size']}, PGD-"
                  f"{result['num_steps']} eps {result['epsilon']:g} step "
                  f"{result['step_size']:g}.", ""]
    for kind, title in _GRID_TITLES.items():
        lines += [f"## {title} (%)", "",
                  "| training \\ inference | " + " | ".join(f"1:{r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for label, cells in result["grid"][kind].items():
            lines.append(f"| {label} | " + " | ".join(_pct(cells[str(r)]) for r in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def ablation_heatmap(result: dict, path: str) -> None:
    """One heat-map panel per grid (clean, transfer, adaptive), written atomically."""
    from madry_ns.analysis import _pyplot, _save_figure

    plt = _pyplot()
    ratios = result["ratios"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(result["checkpoints"]) + 2.2))
    for ax, (kind, title) in zip(axes, _GRID_TITLES.items()):
        labels = list(result["grid"][kind])
        values = np.array([[100 * result["grid"][kind][l][str(r)] for r in ratios]
                           for l in labels])
        ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (a, b), v in np.ndenumerate(values):
            ax.text(b, a, f"{v:.1f}", ha="center", va="center",
                    color="white" if v < 60 else "black", fontsize=8)
        ax.set_xticks(range(len(ratios)))
        ax.set_xticklabels([f"1:{r}" for r in ratios])
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)
        ax.set_xlabel("inference ratio (test:clean)")
        ax.set_ylabel("training model")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def run_ablation(config, paths, labels, ratios, output: str, command: str = "",
                 out=print) -> dict:
    from madry_ns import files

    result = ablation(config, paths, labels, ratios, out=out)
    os.makedirs(output, exist_ok=True)
    files.atomic_write_text(os.path.join(output, "ablation.json"),
                            json.dumps({**result, "command": command}, indent=2) + "\n")
    text = ablation_markdown(result, command)
    files.atomic_write_text(os.path.join(output, "ablation.md"), text)
    ablation_heatmap(result, os.path.join(output, "ablation.png"))
    out(text)
    out(f"wrote {output}/ablation.md, ablation.json, ablation.png")
    return result


# ------------------------------------------------------------------------------------------
# Two suites on the same images, image by image


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of `a` images robust only under one
    model against `b` robust only under the other: the chance of a split at least this
    uneven if either model were equally likely to keep a discordant image."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _robust_per_image(saved: dict, arrays: dict, mode: str, path: str) -> np.ndarray:
    """The worst case per image of one column, rebuilt from per_image.npz with the rows
    results.json counted in it."""
    robust = np.ones(saved["num_examples"], bool)
    for key in ["clean"] + saved["worst_case"][mode]["attacks"]:
        name = f"{key}__{mode}"
        if name not in arrays:
            raise ConfigError(f"compare: {path} counts {key} in its {mode} worst case but "
                              f"the per_image.npz beside it has no {name}")
        robust &= arrays[name]
    return robust


def compare(dir_a: str, dir_b: str, names: tuple = ("A", "B")) -> dict:
    """The per-image worst case of two finished suites on the same test images, column by
    column: how many images each keeps that the other loses, and the sign test of that split.
    Both must have run the same attacks at the same epsilon on the same images, so that the
    only difference left is the model."""
    suites = []
    for d in (dir_a, dir_b):
        found = _read_suite(d, "compare")
        if found is None:
            raise ConfigError(f"compare: {d} has no results.json; give a folder written by "
                              f"python -m madry_ns.evaluate --output")
        saved, arrays, path = found
        if "incomplete" in saved:
            raise ConfigError(f"compare: {path} is an unfinished run; finish it with "
                              f"python -m madry_ns.evaluate ... --output {d} --resume")
        suites.append((saved, arrays, path))
    (sa, aa, pa), (sb, ab, pb) = suites
    for key in ("num_examples", "dataset"):
        if sa.get(key) != sb.get(key):
            raise ConfigError(f"compare: {key} differs: {pa} has {sa.get(key)!r}, "
                              f"{pb} {sb.get(key)!r}; compare suites on the same images")
    if not np.array_equal(aa.get("labels"), ab.get("labels")):
        raise ConfigError(f"compare: the labels in {pa} and {pb} differ image by image; "
                          f"compare suites on the same images")
    if sa["settings"].get("epsilon") != sb["settings"].get("epsilon"):
        raise ConfigError(f"compare: epsilon differs: {sa['settings'].get('epsilon')} in "
                          f"{pa}, {sb['settings'].get('epsilon')} in {pb}")
    columns = [m for m in sa["columns"] if sb["columns"].get(m) == sa["columns"][m]]
    if not columns:
        raise ConfigError(f"compare: {pa} and {pb} share no inference column with the same "
                          f"label: {list(sa['columns'].values())} against "
                          f"{list(sb['columns'].values())}")
    rows = {}
    for m in columns:
        attacks_a, attacks_b = (s["worst_case"][m]["attacks"] for s in (sa, sb))
        if attacks_a != attacks_b:
            raise ConfigError(f"compare: column {m}: the worst case of {pa} counts "
                              f"{attacks_a}, that of {pb} {attacks_b}; run the same attacks")
        ra, rb = _robust_per_image(sa, aa, m, pa), _robust_per_image(sb, ab, m, pb)
        only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
        rows[m] = {"label": sa["columns"][m], "accuracy": [float(ra.mean()), float(rb.mean())],
                   "both": int((ra & rb).sum()), "only": [only_a, only_b],
                   "neither": int((~ra & ~rb).sum()), "sign_test_p": sign_test(only_a, only_b)}
    return {"names": list(names), "suites": [pa, pb], "num_examples": sa["num_examples"],
            "dataset": sa["dataset"], "epsilon": sa["settings"].get("epsilon"),
            "attacks": {m: sa["worst_case"][m]["attacks"] for m in columns}, "columns": rows}


def compare_markdown(result: dict) -> str:
    a, b = result["names"]
    lines = [f"# {a} against {b}: worst case per image", "",
             f"{a}: `{result['suites'][0]}`; {b}: `{result['suites'][1]}`. The same first "
             f"{result['num_examples']} test images of {result['dataset']}; an image counts as "
             f"robust if it is right clean and under every L-inf attack of the column within "
             f"eps {result['epsilon']:g}. The sign test counts only the test images' noise, "
             f"not that of training (each model is one run).", "",
             f"| column | {a} (%) | {b} (%) | robust under both | only {a} | only {b} | "
             f"sign test p |", "|---|---|---|---|---|---|---|"]
    for row in result["columns"].values():
        lines.append(f"| {row['label'].split(' (')[0]} | {_pct(row['accuracy'][0])} | "
                     f"{_pct(row['accuracy'][1])} | {row['both']} | {row['only'][0]} | "
                     f"{row['only'][1]} | {row['sign_test_p']:.3g} |")
    return "\n".join(lines) + "\n"


def _compare_main(argv: list) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m madry_ns.evaluate compare",
        description="Two finished suites on the same images, image by image")
    parser.add_argument("suites", nargs=2, metavar="OUTPUT_DIR",
                        help="two folders written by python -m madry_ns.evaluate --output")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="the two models' names")
    parser.add_argument("--output", help="also write compare.md and compare.json here")
    args = parser.parse_args(argv)
    from madry_ns.cli import report_user_errors

    def go(_):
        from madry_ns import files

        result = compare(*args.suites, names=tuple(args.names))
        text = compare_markdown(result)
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            files.atomic_write_text(os.path.join(args.output, "compare.json"),
                                    json.dumps(result, indent=2) + "\n")
            files.atomic_write_text(os.path.join(args.output, "compare.md"), text)
        print(text, end="")

    report_user_errors(go, [])
    return 0


# ------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    command = "python -m madry_ns.evaluate " + " ".join(argv)
    ablation_mode = bool(argv) and argv[0] == "ablation"
    parser = argparse.ArgumentParser(
        prog="python -m madry_ns.evaluate" + (" ablation" if ablation_mode else ""),
        description=("Table IV: checkpoints x inference ratios" if ablation_mode else
                     "Every attack under BN, PN and BN+Shaping inference, with sanity checks"))
    parser.add_argument("--config", default="config.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--num_examples", type=int, help="first N test images "
                        "(default: num_eval_examples)")
    parser.add_argument("--batch_size", type=int, help="default: eval_batch_size")
    parser.add_argument("--seed", type=int, help="attack seed (default: np_random_seed)")
    parser.add_argument("--output", help="output folder (default model_dir/eval/suite-STEP)")
    if ablation_mode:
        parser.add_argument("--checkpoints", nargs="+", required=True,
                            help="one checkpoint (or model_dir) per training ratio")
        parser.add_argument("--labels", nargs="+", required=True,
                            help="one row name per checkpoint, e.g. 1:1 1:2 1:3 1:7")
        parser.add_argument("--ratios", type=_csv, default=tuple(map(str, ABLATION_RATIOS)),
                            help="inference ratios r of 1:r (default 0,1,3,9,19,49)")
    else:
        defaults = Settings()
        parser.add_argument("--checkpoint", help="default: the latest in model_dir")
        parser.add_argument("--attacks", type=_csv, default=defaults.attacks,
                            help=f"comma-separated, among {','.join(ROW)} (default: all)")
        parser.add_argument("--modes", type=_csv, default=defaults.modes,
                            help="inference columns among bn,pn,shaped (default: all)")
        for name in _INT_SETTINGS:
            parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
        parser.add_argument("--no_sanity", action="store_true",
                            help="skip the gradient-masking checks")
        parser.add_argument("--resume", action="store_true",
                            help="keep the rows already in --output (same checkpoint and "
                                 "settings) and run only the rest")
    args = parser.parse_args(argv[1:] if ablation_mode else argv)
    from madry_ns.cli import import_tensorflow_quietly, report_user_errors

    def go(_):
        overrides = list(args.set)
        for key, value in (("num_eval_examples", args.num_examples),
                           ("eval_batch_size", args.batch_size),
                           ("np_random_seed", args.seed)):
            if value is not None:
                overrides.append(f"{key}={value}")
        config = config_lib.load(args.config, overrides)
        if ablation_mode:
            ratios = []
            for r in args.ratios:
                if not r.isdigit():
                    raise ConfigError(f"--ratios {r}: expected non-negative integers r of 1:r")
                ratios.append(int(r))
            import_tensorflow_quietly()
            run_ablation(config, args.checkpoints, args.labels, ratios,
                         args.output or os.path.join(config.model_dir, "eval", "ablation"),
                         command)
            return
        settings = Settings(attacks=args.attacks, modes=args.modes,
                            **{k: getattr(args, k) for k in _INT_SETTINGS},
                            sanity=not args.no_sanity)
        check_modes(config, settings.modes)
        import_tensorflow_quietly()
        run(config, settings, args.checkpoint, args.output, command, resume=args.resume)

    report_user_errors(go, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
