"""The suite itself: settings, the compiled forwards and attacks of one model, the main loop.

Columns are inference modes of `madry_ns.inference`, keyed as the config's `inference_bn`
('batch', 'population', 'shaped'; the earlier 'bn' and 'pn' are accepted and read from older
results folders); on a model with RNA layers each mode gives two columns, the examples
classified on a fresh path and on the attack's own path (`rows.table_columns`); rows come from
`madry_ns.evaluate.rows`; seeds from `madry_ns.seeds`. TensorFlow is imported when a `Suite`
is built, so settings can be checked (and `--help` shown) in milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from typing import Callable

import numpy as np

from madry_ns import inference, seeds
from madry_ns.errors import ConfigError
from madry_ns.evaluate import rows as rows_lib
from madry_ns.evaluate.resume import SANITY_PREFIX
from madry_ns.evaluate.rows import (ATTACK_PATH, COLUMNS, FRESH_PATH, ROW, column_parts,
                                    random_paths, table_columns)

MODES = COLUMNS
INT_SETTINGS = ("eot_samples", "cw_steps", "cw_search_steps", "deepfool_iters", "apgd_steps",
                 "apgd_targets", "square_queries", "shaping_groups", "sanity_step_factor",
                 "sanity_restarts", "apgd_restarts", "apgd_eot_samples", "fab_steps",
                 "fab_restarts", "fab_targets")
# AutoAttack's real-valued parameters (used by --autoattack custom); all but fab_eta (an
# overshoot, >= 1) are fractions in (0, 1].
FLOAT_SETTINGS = ("apgd_rho", "fab_alpha_max", "fab_eta", "fab_beta", "square_p_init")
# How the suite seeds a shaped column's references, in its column label.
_SHAPED_SEEDING = "the defense's references for batch i drawn from seed (inference_seed, i)"


def _all_rows() -> tuple:
    return tuple(ROW)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the suite runs besides the config's PGD (epsilon, steps, step size, loss)."""

    attacks: tuple = dataclasses.field(default_factory=_all_rows)
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
    # The autoattack row's version (rows.AUTOATTACK_VERSIONS): 'legacy' is the ensemble the
    # recorded results were made with; 'custom' runs `autoattack_attacks` with the settings
    # apgd_* / fab_* / square_* (defaults: the official standard version's values).
    autoattack: str = "legacy"
    autoattack_attacks: tuple = ("apgd-ce", "apgd-t", "fab-t", "square")
    apgd_restarts: int = 1
    apgd_rho: float = 0.75
    # APGD-CE's and APGD-DLR's EOT draws per gradient in 'rand' and 'custom'; None: the
    # version's own (rand: AutoAttack's 20; custom: 1, no EOT).
    apgd_eot_samples: int | None = None
    fab_steps: int = 100
    fab_restarts: int = 1
    fab_targets: int = 9
    fab_alpha_max: float = 0.1
    fab_eta: float = 1.05
    fab_beta: float = 0.9
    square_p_init: float = 0.8
    sanity: bool = True
    sanity_step_factor: int = 5
    sanity_restarts: int = 3

    def __post_init__(self):
        object.__setattr__(self, "modes", rows_lib.canonical_modes(self.modes))
        if self.apgd_eot_samples is None:
            object.__setattr__(self, "apgd_eot_samples", 20 if self.autoattack == "rand" else 1)
        for name, allowed in (("attacks", ROW), ("modes", rows_lib.columns())):
            values = getattr(self, name)
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ConfigError(f"--{name} {','.join(values)}: expected a comma-separated "
                                  f"list among {', '.join(allowed)}")
        for name in INT_SETTINGS:
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ConfigError(f"--{name} {value}: expected a positive integer")
        for name in FLOAT_SETTINGS:
            value = getattr(self, name)
            ok, expected = ((value >= 1, "a number >= 1") if name == "fab_eta"
                            else (0 < value <= 1, "a number in (0, 1]"))
            if not ok:
                raise ConfigError(f"--{name} {value}: expected {expected}")
        if self.autoattack not in rows_lib.AUTOATTACK_VERSIONS:
            raise ConfigError(f"--autoattack {self.autoattack}: expected one of "
                              f"{', '.join(rows_lib.AUTOATTACK_VERSIONS)}")
        names = self.autoattack_attacks
        if (not names or len(set(names)) != len(names)
                or any(a not in rows_lib.AUTOATTACK_NAMES for a in names)):
            raise ConfigError(f"--autoattack_attacks {','.join(names)}: expected distinct "
                              f"names among {', '.join(rows_lib.AUTOATTACK_NAMES)}")
        if self.shaping_groups < 2:
            raise ConfigError(f"--shaping_groups {self.shaping_groups}: the shaping attack "
                              f"needs at least 2 groups (clean company for each attacked one)")
        if not self.fgsm_large_epsilon > 0:
            raise ConfigError(f"--fgsm_large_epsilon {self.fgsm_large_epsilon}: expected a "
                              f"positive number (0-255 scale)")


def mode_of(column: str) -> inference.Mode:
    """The inference mode of a suite column (on random paths, of either reading)."""
    return inference.get(column_parts(column)[0])


def default_modes(config) -> tuple:
    """Every column mode the config's model can run: all, or on random paths (RNA) those
    that are one network forward (BN+Shaping needs the batch split with references)."""
    if random_paths(config):
        return tuple(m for m in MODES if mode_of(m).bn_mode is not None)
    return MODES


def check_modes(config, modes) -> None:
    """Raise ConfigError when the config cannot run a column (shaped batch split; shaped
    on random paths)."""
    for m in modes:
        if random_paths(config) and mode_of(m).bn_mode is None:
            raise ConfigError(f"mode {m!r} with norm_layer 'rna': a model with RNA layers "
                              f"classifies on random paths, each forward one network pass; "
                              f"BN+Shaping's split with reference images is for batch-norm "
                              f"models; use {' or '.join(default_modes(config))}")
        error = mode_of(m).check(config)
        if error:
            raise ConfigError(error)


def paths_config(config, model):
    """`config` with its random-path keys (`norm_layer`, `rna_candidates`, `rna_sampling`)
    read from `model`, which the labels then describe. The suite classifies on both readings
    (`rows.table_columns`), so `rna_inference_path` is 'fresh' here whatever the config says.
    A model without RNA layers leaves a config with norm_layer 'bn' as it is."""
    from madry_ns import rna

    if not rna.has_rna(model):
        return config if not random_paths(config) else config.replace(norm_layer="bn")
    return config.replace(norm_layer="rna",
                          rna_candidates=list(model.rna_layers()[0].candidates),
                          rna_sampling=getattr(model, "rna_sampling", config.rna_sampling),
                          rna_inference_path="fresh")


def _paths_text(config, mode: str) -> str:
    stats = "population" if mode == "population" else "test-batch"
    return (f"RNA over {'/'.join(config.rna_candidates)}, "
            f"{config.rna_sampling.replace('_', '-')} paths, BN candidate with {stats} "
            f"statistics")


def column_label(config, mode: str) -> str:
    """How a column classifies (on random paths: on which path)."""
    key, reading = column_parts(mode)
    if reading is None:
        return mode_of(key).label(config, _SHAPED_SEEDING)
    if reading == FRESH_PATH:
        how = ("test batch i classified on one path drawn from seed (inference_seed, i), "
               "independent of every attack's path: the released protocol, a transfer "
               "between paths")
    else:
        how = (f"test batch i classified on the attacker's own path, "
               f"{rows_lib.attacker_path_text()}, the path its examples were generated on: "
               f"white-box on one path; rows averaging over paths have no cell")
    return f"{column_short(config, mode)} ({_paths_text(config, key)}; {how})"


def column_short(config, mode: str) -> str:
    key, reading = column_parts(mode)
    short = mode_of(key).short(config)
    if reading is None:
        return short
    return f"{short}, " + ("fresh path" if reading == FRESH_PATH else "attack's path")


def row_label(config, settings: Settings, key: str) -> str:
    """How a row's examples are generated, in full."""
    return ROW[key].describe(config, settings)


# The worst case on random paths, in results.json and results.md.
PATHS_NOTE = ("On random paths every column classifies all rows' examples of test batch i on "
              "one and the same path (fresh: seed (inference_seed, i); attack's: the "
              "attacker's own path), so each column's worst case combines cells judged by one "
              "sub-network per batch; the two readings are never combined.")


def row_epsilon(config, settings: Settings, key: str) -> float | None:
    """The L-inf budget of a row (None for unbounded L2 attacks)."""
    return ROW[key].budget(config, settings)


# ------------------------------------------------------------------------------------------
# The forwards and the attacks


@contextlib.contextmanager
def arithmetic_rewrite_off(active: bool = True):
    """Grappler's arithmetic optimizer off inside the block (when `active`), as it was after.

    The sums of APGD's EOT loop, nested in its step loop (AutoAttack 'rand'), made Grappler's
    AddOpsRewrite temporaries collide on CPU (AlreadyExistsError
    ".../AddOpsRewrite_add_1/tmp_var", TensorFlow 2.21; tensorflow#23780), through RNA's
    switch_case and, in `studies.rna`, on a plain-BN model's single draw too. That rewrite only
    regroups additions, so `run` turns it off while it evaluates a random-path model; a
    `Suite` built by hand for one should be used inside this block too, calls included
    (whether a function compiled inside keeps the setting when called after the block is
    TensorFlow's business, so call it inside)."""
    if not active:
        yield
        return
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options().get("arithmetic_optimization")
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    try:
        yield
    finally:
        # An option never set reads as absent, and the optimizer's default is on.
        tf.config.optimizer.set_experimental_options(
            {"arithmetic_optimization": True if before is None else before})


class Suite:
    """The compiled forwards and attacks of one model under one config (for a random-path
    model, use it inside `arithmetic_rewrite_off()`, as `run` does)."""

    def __init__(self, model, config, dataset, settings: Settings):
        import tensorflow as tf

        from madry_ns import attacks
        from madry_ns.graph import function_for

        config = paths_config(config, model)
        self.tf, self.model, self.config, self.settings = tf, model, config, settings
        self.compile = function_for(model)  # tf.function; AutoGraph off for toolkit models
        self.random_paths = random_paths(config)
        # The table's columns; the sanity checks run where attack and judge share the forward
        # (on random paths: the attack's own path).
        self.columns = table_columns(config, settings.modes)
        self.sanity_columns = tuple(c for c in self.columns
                                    if column_parts(c)[1] in (None, ATTACK_PATH))
        # Shaped columns always draw fresh references, from (inference_seed, batch index).
        self._fresh = config.replace(inference_references="fresh")
        self._forwards = {m: inference.forward(model, self._fresh, dataset, mode_of(m).key)
                          for m in settings.modes}
        self._classify = {c: self.compile(self.forward(c)) for c in self.columns}
        self._compiled: dict = {}
        self.attacks = attacks

    def attack_forward(self, column: str) -> Callable:
        """`forward` for an attack made for `column` (a column or a mode): the column's own
        forward; on random paths the attacker's own path for batch i, in the column's mode."""
        return self.forward(column, other=self.random_paths)

    def forward(self, mode: str, other: bool = False) -> Callable:
        """`fn(x, i, draw=None) -> logits`: the column's forward for batch i, drawing what it
        draws from the defense's seed for batch i (`other`, or an attack's-path column: the
        attacker's own draw; `draw`: an explicit seed, for EOT)."""
        mode, reading = column_parts(mode)
        other = other or reading == ATTACK_PATH
        built = self._forwards.get(mode)
        if built is None:  # a column outside settings.modes: the PN transfer source
            built = inference.forward(self.model, self._fresh, None, mode_of(mode).key)
            self._forwards[mode] = built
        config = self.config

        def fn(x, i, draw=None):
            if draw is None:
                draw = seeds.reference_draw(config, i)
                if other:
                    draw = seeds.attacker_draw(draw)
            return built.classify(x, draw)
        return fn

    def classify(self, mode: str, x, i: int):
        """Predicted labels of x (batch i) under a column."""
        tf = self.tf
        logits = self._classify[mode](tf.convert_to_tensor(x, tf.float32),
                                      tf.constant(i, tf.int64))
        return np.argmax(logits.numpy(), 1)

    def pgd_through(self, mode: str, *, other=False, epsilon=None, num_steps=None,
                    step_size=None, restart: int = 0):
        """Compiled `fn(x, y, i) -> x_adv`: the config's PGD through a column's forward (on
        random paths on the attacker's own path)."""
        c = self.config
        params = dict(epsilon=float(epsilon or c.epsilon), num_steps=int(num_steps or c.num_steps),
                      step_size=float(step_size or c.step_size), random_start=c.random_start)
        # One compiled attack per forward: on random paths a mode's readings share theirs.
        mode, reading = column_parts(mode)
        other = other or self.random_paths or reading == ATTACK_PATH
        key = ("pgd", mode, other, tuple(params.values()), restart)
        if key not in self._compiled:
            fwd = self.forward(mode, other)
            loss = self.attacks.LOSSES[c.loss_func]

            @self.compile
            def run(x, y, i):
                return self.attacks.pgd(
                    lambda z: self.tf.reduce_sum(loss(fwd(z, i), y)), x,
                    seed=seeds.row_start(c, "suite_pgd", i, restart), **params)
            self._compiled[key] = run
        return self._compiled[key]

    def generator(self, key: str, mode: str | None) -> Callable:
        """Compiled `fn(x, y, i) -> x_adv` of row `key` (for 'own' rows, through `mode`)."""
        cache = (key, mode)
        if cache not in self._compiled:
            fn = ROW[key].make(self, mode)
            if not hasattr(fn, "get_concrete_function"):  # already compiled (adaptive PGD)
                fn = self.compile(fn)
            self._compiled[cache] = fn
        return self._compiled[cache]

    def shaping_attack(self, x, y, seed):
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
                # A Python int folds as int32, unlike `seeds.fold` (int64): kept as recorded.
                seed=tf.random.experimental.stateless_fold_in(seed, g)))
        return tf.concat(out, 0)


def batches(dataset, config) -> list:
    """The suite's test batches: the first num_eval_examples images, eval_batch_size each."""
    from madry_ns import data

    return list(data.eval_batches(dataset.test_images, dataset.test_labels,
                                  config.num_eval_examples, config.eval_batch_size))


def pgd_accuracy(suite: Suite, test_batches, mode: str, **params) -> np.ndarray:
    """Per image: classified correctly by `mode` after the config's PGD through it."""
    fn = suite.pgd_through(mode, **params)
    tf = suite.tf
    hits = []
    for i, (x, y) in enumerate(test_batches):
        adv = fn(tf.constant(x), tf.constant(y, tf.int64), tf.constant(i, tf.int64))
        hits.append(suite.classify(mode, adv, i) == y)
    return np.concatenate(hits)


# ------------------------------------------------------------------------------------------
# The table


def run_suite(model, dataset, config, settings: Settings | None = None, out=print,
              on_row: Callable[[dict, dict], None] | None = None,
              previous=None) -> dict:
    """Run the suite on the first `num_eval_examples` test images in batches of
    `eval_batch_size`; returns the `results.json` content (without checkpoint details).

    `on_row`, if given, receives the results so far and the per-image arrays (`per_image`)
    after each attack (marked `incomplete`, with the attacks still to run) and once at the
    end, so an evaluation stopped after hours keeps its rows. `previous` (a
    `resume.ResumeState`) holds rows of an earlier run with the same settings: those attacks
    are not run again, after checking that the clean predictions are the same image by
    image."""
    config = paths_config(config, model)
    settings = settings or Settings(modes=default_modes(config))
    check_modes(config, settings.modes)
    with arithmetic_rewrite_off(random_paths(config)):
        return _run_suite(model, config, dataset, settings, out, on_row, previous)


def _run_suite(model, config, dataset, settings, out, on_row, previous) -> dict:
    from madry_ns.evaluate import resume, sanity
    from madry_ns.progress import Progress

    suite = Suite(model, config, dataset, settings)
    test_batches = batches(dataset, config)
    y_all = np.concatenate([y for _, y in test_batches])
    n, sizes = len(y_all), [len(y) for _, y in test_batches]
    modes = suite.columns
    correct: dict = {}  # (row, mode) -> [n] bool
    done, total_start = [], time.perf_counter()

    def classify_all(x_list, mode):
        return np.concatenate([suite.classify(mode, x, i) for i, x in enumerate(x_list)]) == y_all

    clean = {m: classify_all([x for x, _ in test_batches], m) for m in modes}
    reused = resume.reusable_rows(previous, y_all, clean) if previous else {}

    def summary():
        return _summary(config, settings, dataset, modes, n, clean, correct, done)

    def arrays():
        return per_image(y_all, clean, correct)

    out("clean: " + "  ".join(f"{column_short(config, m)} {100 * clean[m].mean():.2f}%"
                              for m in modes))
    for position, key in enumerate(settings.attacks):
        row = ROW[key]
        cols = row.cells(settings, modes)
        if not cols:
            if suite.random_paths and row.paths is None:
                out(_skip_note([key]))
            continue
        if key in reused:  # the resume state kept only rows with every column's outcomes
            done.append(reused[key])
            correct.update({(key, m): previous["correct"][(key, m)] for m in cols})
            out(_row_line(config, key, reused[key]["accuracy"], "from --resume"))
            continue
        parts = previous.row_parts(key) if previous else resume.RowParts(key)
        start = time.perf_counter() - parts.seconds  # a resumed row counts its earlier time
        groups = _generations(suite, row, cols)
        bar = Progress(len(test_batches) * len(groups), key)
        cells, distances = {}, []
        pending = [k for k in settings.attacks[position:] if ROW[k].cells(settings, modes)]
        for g, (gen, judged) in enumerate(groups):
            fn, first = None, parts.batches_done(g, sizes)
            bar.update(first)
            for i, (x, y) in enumerate(test_batches[first:], start=first):
                fn = fn or suite.generator(key, gen)
                tf = suite.tf
                adv = fn(tf.constant(x), tf.constant(y, tf.int64), tf.constant(i, tf.int64))
                adv, hit = adv if row.judged_by_attack else (adv, None)
                adv = adv.numpy()
                outcomes = {m: hit.numpy() if hit is not None else suite.classify(m, adv, i) == y
                            for m in judged}
                parts.add(g, {**{f"correct__{m}": v for m, v in outcomes.items()},
                              **{f"move__{k}": v for k, v in _moves(adv, x).items()}})
                bar.update()
                if on_row is not None:  # a row can take an hour: keep every batch it made
                    parts.seconds = time.perf_counter() - start
                    inside = {"key": key, "seconds": round(parts.seconds, 2),
                              "batches": [parts.batches_done(h, sizes) for h in parts.parts],
                              "of": len(sizes)}
                    on_row({**summary(), "incomplete": {
                        "pending_attacks": pending, "sanity_pending": settings.sanity,
                        "row_in_progress": inside}}, {**arrays(), **parts.arrays()})
            distances.append(_distances(parts, g))
            for m in judged:
                correct[(key, m)] = parts.get(g, f"correct__{m}")
                cells[m] = float(correct[(key, m)].mean())
        bar.close()
        seconds = time.perf_counter() - start
        moved = {m: d for (_, judged), d in zip(groups, distances) for m in judged}
        done.append({"key": key, "attack": row.title(config, settings),
                     "generation": row.describe(config, settings),
                     "threat_model": row.norm, "epsilon": row.budget(config, settings),
                     "accuracy": cells, "perturbation": distances[0] if len(distances) == 1
                     else {m: moved[m] for m in cols}, "seconds": round(seconds, 2)})
        out(_row_line(config, key, cells, f"{seconds:.1f} s"))
        pending = pending[1:]
        if on_row is not None and pending:
            on_row({**summary(), "incomplete": {"pending_attacks": pending,
                                                "sanity_pending": settings.sanity}}, arrays())

    result = summary()
    if reused:
        result["resumed_rows"] = [r["key"] for r in done if r["key"] in reused]
    checked = sanity.Parts(previous["sanity_parts"] if previous else None)

    def all_arrays():
        return {**arrays(), **sanity_arrays(checked.done)}

    if settings.sanity:
        if previous and previous["sanity"] and not reused.keys() ^ {r["key"] for r in done}:
            result["sanity"] = previous["sanity"]  # made from these very rows
            out("sanity checks: from --resume")
        else:
            pending = {**result, "incomplete": {"pending_attacks": [], "sanity_pending": True}}
            if on_row is not None:  # each check's attack is saved at once: they take hours
                checked.on_part = lambda name, outcomes: on_row(pending, all_arrays())
                on_row(pending, all_arrays())
            result["sanity"] = sanity.sanity_checks(suite, dataset, config, settings, result,
                                                    correct, out=out, parts=checked)
    result["seconds"] = round(time.perf_counter() - total_start, 2)
    if on_row is not None:
        on_row(result, all_arrays())
    return result


def sanity_arrays(done: dict) -> dict:
    """The sanity checks' per-image outcomes for `per_image.npz`, as `sanity__NAME`."""
    return {f"{SANITY_PREFIX}{name}": np.asarray(v, bool) for name, v in done.items()}


def _skip_note(keys) -> str:
    return (f"{', '.join(keys)}: skipped: made for BN+Shaping (its batch split or reference "
            f"draws), not for a model with random paths")


def _generations(suite: Suite, row, cols: list) -> list:
    """[(generation key, the columns its examples are judged in)] of a row: one generation
    for rows made once (on PN, by the shaping attack); for rows made through each column's
    own forward, one per column, except on random paths, where a mode's two readings share
    the attacker's generation (unless the attack judges its own outputs)."""
    if row.generation != "own":
        return [(None, list(cols))]
    if not suite.random_paths or row.judged_by_attack:
        return [(m, [m]) for m in cols]
    modes = list(dict.fromkeys(column_parts(m)[0] for m in cols))
    return [(mode, [m for m in cols if column_parts(m)[0] == mode]) for mode in modes]


def _moves(adv: np.ndarray, x: np.ndarray) -> dict:
    """Per image of a batch, how far its example moved (0-255 scale) and its pixel range."""
    d = (adv - x).reshape(len(x), -1)
    flat = adv.reshape(len(x), -1)
    return {"l2": np.sqrt((d ** 2).sum(1)), "linf": np.abs(d).max(1), "low": flat.min(1),
            "high": flat.max(1)}


def _distances(parts, g: int) -> dict:
    """How far a generation's examples moved (0-255 scale), from its per-image `_moves`."""
    l2 = parts.get(g, "move__l2")
    # CW returns the clean image where it found nothing: the median over all images would
    # then read 0, so the perturbed images are counted apart.
    moved = l2 > 0
    return {"linf_max": float(parts.get(g, "move__linf").max()),
            "l2_median": float(np.median(l2)), "perturbed": float(moved.mean()),
            "l2_median_perturbed": float(np.median(l2[moved])) if moved.any() else None,
            "pixel_min": float(parts.get(g, "move__low").min()),
            "pixel_max": float(parts.get(g, "move__high").max())}


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


def worst_case(config, settings: Settings, modes, clean: dict, correct: dict) -> dict:
    """Per column: an image counts as robust only if it is right clean and under every L-inf
    attack within the config's epsilon that has run."""
    worst = {}
    for m in modes:
        within = []
        for k in settings.attacks:
            budget = ROW[k].budget(config, settings) if (k, m) in correct else None
            if budget is not None and budget <= config.epsilon:
                within.append(k)
        robust = clean[m].copy()
        for k in within:
            robust &= correct[(k, m)]
        single = {k: float(correct[(k, m)].mean()) for k in within}
        worst[m] = {"per_image": float(robust.mean()), "attacks": within,
                    "weakest_single_attack": min(single, key=single.get) if single else None,
                    "single_min": min(single.values()) if single else None}
    return worst


def _summary(config, settings: Settings, dataset, modes, n, clean, correct, done) -> dict:
    summary = {
        **identity(config, settings, dataset, n),
        "clean": {m: float(clean[m].mean()) for m in modes},
        "rows": list(done), "worst_case": worst_case(config, settings, modes, clean, correct),
    }
    if random_paths(config):
        summary["random_paths"] = {"worst_case": PATHS_NOTE}
    return summary


def identity(config, settings: Settings, dataset, n: int) -> dict:
    """What makes two evaluations the same experiment (compared by --resume)."""
    return {
        "num_examples": n, "model": config.model, "dataset": dataset.source,
        "columns": {m: column_label(config, m) for m in table_columns(config, settings.modes)},
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
# A checkpoint in, files out


def load_checkpoint(config, path: str | None):
    """(resolved path, model) of `path` (default: the latest checkpoint in model_dir)."""
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
    from madry_ns.evaluate import reports
    from madry_ns.evaluate.resume import ResumeState

    check_modes(config, settings.modes)
    dataset = data.load_dataset(config)
    path, model = load_checkpoint(config, checkpoint)
    config = paths_config(config, model)
    skipped = [k for k in settings.attacks if ROW[k].paths is None] \
        if random_paths(config) else []
    if skipped:  # the default --attacks (all) holds them; evaluate_model refuses them
        if len(skipped) == len(settings.attacks):
            raise ConfigError(f"--attacks {','.join(skipped)}: made for BN+Shaping (its batch "
                              f"split or reference draws); {config.model} here has RNA layers "
                              f"and classifies on random paths")
        out(_skip_note(skipped))
        settings = dataclasses.replace(settings, attacks=tuple(
            k for k in settings.attacks if k not in skipped))
    step = checkpoints.checkpoint_step(path)
    output = output or os.path.join(config.model_dir, "eval", f"suite-{step}")
    previous = None
    if resume:
        n = sum(len(y) for _, y in batches(dataset, config))
        previous = ResumeState.load(output, {**identity(config, settings, dataset, n),
                                             "checkpoint": path})
        out(f"--resume: {len(previous['rows'])} rows from {previous['path']}" if previous
            else f"--resume: nothing in {output} yet, starting afresh")
        if previous and previous.already_done(settings):
            out(f"--resume: {output} already holds every row asked for"
                f"{' and the sanity checks' if settings.sanity else ''}; nothing to run, "
                f"its files are left as they are")
            return previous["saved"]
    out(f"checkpoint {path} (step {step}), first {config.num_eval_examples} test images of "
        f"{dataset.source}")
    header = {"checkpoint": path, "step": step, "command": command,
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    from madry_ns.evaluate.api import evaluate_model

    n = config.num_eval_examples
    data.check_num_examples(n, len(dataset.test_images))  # slicing would truncate silently
    found = evaluate_model(
        model, dataset.test_images[:n], dataset.test_labels[:n], config=config,
        references=dataset.train_images, source=dataset.source, out=out, previous=previous,
        on_row=lambda partial, arrays: reports.write_results({**header, **partial}, output,
                                                             arrays),
        **dataclasses.asdict(settings))
    result = {**header, **found.results}
    # TensorBoard beside the model's training curves: model_dir/eval/suite, at its step.
    found.to_tensorboard(os.path.join(config.model_dir, "eval", "suite"), step or 0)
    out(reports.markdown(result))
    out(f"wrote {output}/results.md and results.json")
    return result


__all__ = ["MODES", "PATHS_NOTE", "Settings", "Suite", "batches", "check_modes", "column_label",
           "column_short", "default_modes", "identity", "load_checkpoint", "paths_config",
           "per_image", "pgd_accuracy", "row_label", "row_epsilon", "run", "run_suite",
           "worst_case"]
