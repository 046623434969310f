"""The suite's attack rows, as data: one `Row` per attack, in one registry.

A row declares its key, its table name, how its examples are generated (`generation`: on the
PN forward, by the shaping attack, or through each column's own forward), the columns it has
a cell in, its threat model and budget (`epsilon`), its seed stream by name
(`madry_ns.seeds`), the label that says how its examples were made, and `make(suite, mode)`,
which returns the attack `fn(x, y, i) -> x_adv` for batch i (compiled by the suite). Adding a
row is one `register(Row(...))`: `--attacks`, the table, the worst case, the sanity checks
and `--resume` read the registry.

Rows that report per image whether every attack in them failed (`judged_by_attack`, the
AutoAttack-style ensemble) return `(x_adv, robust)`: re-classifying the per-image mix would
put images in a batch no attack produced, which matters for batch-statistics columns.

On a model with RNA layers (random paths) every inference mode gives two columns, its two
*readings* (`table_columns`): `MODE_fresh_path` classifies test batch i on a path drawn from
(inference_seed, i), independent of every attack's path (the released protocol, a transfer
between paths); `MODE_attack_path` on the attacker's own path for batch i, (inference_seed,
ATTACKER_DRAW_OFFSET + i), the path the examples were generated on (white-box on one path).
A row's `paths(settings)` says which readings it has a cell in (rows averaging their
gradients over paths have no single attack path: fresh only) and `path_label` how its
examples meet the paths; `paths=None` marks rows made for BN+Shaping (the batch split,
reference draws), skipped on random paths.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from madry_ns import seeds

# The autoattack row's versions (`--autoattack`): 'legacy' is the suite's earlier ensemble
# (attacks.autoattack_style), the others AutoAttack's (attacks.VERSIONS) and 'custom'; and the
# attacks `--autoattack_attacks` may list (attacks.AUTOATTACK_ATTACKS, without importing TF).
AUTOATTACK_VERSIONS = ("legacy", "standard", "plus", "rand", "custom")
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")

# The suite's columns in the paper's table order (BN, PN, BN+Shaping), keyed by the config's
# own `inference_bn` values; the earlier 'bn' and 'pn' are accepted as aliases
# (`madry_ns.inference.ALIASES`). Then any other registered mode under its own key.
COLUMNS = ("batch", "population", "shaped")
# The two readings of a mode on random paths (RNA), as suffixes of the column keys.
FRESH_PATH, ATTACK_PATH = "fresh_path", "attack_path"
READINGS = (FRESH_PATH, ATTACK_PATH)


def columns() -> tuple:
    """Every column the suite can run: COLUMNS, then modes registered beyond them."""
    from madry_ns import inference

    return COLUMNS + tuple(k for k in inference.MODES if k not in COLUMNS)


def canonical_modes(modes) -> tuple:
    """`modes` in the config's vocabulary ('pn' -> 'population', 'bn' -> 'batch')."""
    from madry_ns import inference

    return tuple(inference.ALIASES.get(m, m) for m in modes)


def random_paths(config) -> bool:
    """Whether the config's model classifies on random paths (RNA layers)."""
    return config.norm_layer == "rna"


def table_columns(config, modes) -> tuple:
    """The table's columns for inference modes `modes`: the modes themselves, or on random
    paths each mode's two readings (`MODE_fresh_path`, `MODE_attack_path`)."""
    if not random_paths(config):
        return tuple(modes)
    return tuple(f"{m}_{r}" for m in modes for r in READINGS)


def column_parts(column: str) -> tuple:
    """(inference mode, reading) of a column key; the reading is None off random paths."""
    for reading in READINGS:
        if column.endswith("_" + reading):
            return column[:-len(reading) - 1], reading
    return column, None


def attacker_path_text() -> str:
    """Where the attacker's own random path for test batch i comes from."""
    return f"seed (inference_seed, {seeds.ATTACKER_DRAW_OFFSET} + i)"


def _one_path(settings) -> tuple:
    del settings
    return READINGS


def _one_path_label(config, settings) -> str:
    del config, settings
    return (f"on random paths: generated on the attacker's own path for test batch i "
            f"({attacker_path_text()}), so white-box in the attack's-path columns of its "
            f"mode and a transfer between paths in the fresh-path ones")


@dataclasses.dataclass(frozen=True)
class Row:
    """One attack row (see the module docstring)."""

    key: str
    name: str
    generation: str  # 'population', 'shaping' or 'own' (through each column's own forward)
    make: Callable  # (suite, mode or None) -> fn(x, y, i)
    label: Callable  # (config, settings) -> how the examples are made
    stream: str  # the seed stream of its random starts (madry_ns.seeds)
    modes: tuple | None = None  # the only columns it has a cell in (None: every column)
    norm: str = "linf"  # 'linf' (bounded) or 'l2' (unbounded minimal-perturbation attacks)
    epsilon: Callable = lambda config, settings: config.epsilon  # L-inf budget (linf rows)
    judged_by_attack: bool = False  # fn returns (x_adv, robust per image)
    needs_toolkit_bn: bool = False  # calls the model with bn_mode=... itself
    names: Callable | None = None  # (config, settings) -> table name, when it depends on them
    # On random paths (module docstring): settings -> the readings it has cells in (None: not
    # run on random paths; `modes` then does not apply), and (config, settings) -> how its
    # examples meet the paths, added to its label.
    paths: Callable | None = _one_path
    path_label: Callable = _one_path_label

    def __post_init__(self):  # rows written with the earlier column names mean the same
        object.__setattr__(self, "generation", canonical_modes([self.generation])[0])
        if self.modes is not None:
            object.__setattr__(self, "modes", canonical_modes(self.modes))

    def title(self, config, settings) -> str:
        """The row's table name under these settings."""
        return self.name if self.names is None else self.names(config, settings)

    def budget(self, config, settings) -> float | None:
        """The row's L-inf budget on the 0-255 scale (None for unbounded L2 attacks)."""
        return None if self.norm == "l2" else float(self.epsilon(config, settings))

    def describe(self, config, settings) -> str:
        """How the row's examples are generated, in full (on random paths, on which)."""
        text = self.label(config, settings)
        if random_paths(config) and self.paths is not None:
            text += f"; {self.path_label(config, settings)}"
        return text

    def has_cell(self, mode: str) -> bool:
        """Whether the row is run under column `mode` (a model without random paths)."""
        return self.modes is None or mode in self.modes

    def cells(self, settings, columns) -> list:
        """The columns among `columns` (`table_columns`) the row has a cell in."""
        out = []
        for column in columns:
            mode, reading = column_parts(column)
            if reading is None:
                if self.has_cell(mode):
                    out.append(column)
            elif self.paths is not None and reading in self.paths(settings):
                out.append(column)
        return out

    def is_transfer_in(self, mode: str) -> bool:
        """Whether the row's examples were made on another forward than column `mode`'s
        (on random paths: in another inference mode)."""
        return self.generation not in ("own", column_parts(mode)[0])


ROW: dict[str, Row] = {}


def register(row: Row) -> Row:
    """Add `row` at the end of the table (a later registration under its key replaces it)."""
    ROW[row.key] = row
    return row


def unregister(key: str) -> None:
    """Remove a row (for rows added by tests or plug-ins)."""
    ROW.pop(key, None)


def rows() -> tuple:
    """The registered rows, in table order."""
    return tuple(ROW.values())


# ------------------------------------------------------------------------------------------
# Labels shared by several rows


def pgd_text(config) -> str:
    """The config's PGD in words."""
    start = ", random start" if config.random_start else ""
    return (f"PGD-{config.num_steps} ({config.loss_func}, eps {config.epsilon:g}, step "
            f"{config.step_size:g}{start})")


# ------------------------------------------------------------------------------------------
# The rows of the norm-shaping paper's Tables I/II and the attacks that know the defense


def _on_pn(make_attack):
    """`make` for a row generated once on the PN forward: `make_attack(suite, logits_fn,
    x, y, seed)` with the batch's PN forward and the row's seed."""
    def make(suite, mode, row_key):
        del mode
        pn = suite.attack_forward("population")
        stream = ROW[row_key].stream

        def attack(x, y, i):
            return make_attack(suite, lambda z: pn(z, i), x, y,
                               seeds.row_start(suite.config, stream, i))
        return attack
    return make


def _pn_row(key, name, make_attack, label, stream, **kwargs) -> Row:
    make = _on_pn(make_attack)
    return Row(key, name, "population", lambda suite, mode: make(suite, mode, key), label, stream,
               **kwargs)


def _fgsm(suite, fwd, x, y, seed, *, large=False):
    eps = suite.settings.fgsm_large_epsilon if large else suite.config.epsilon
    return suite.attacks.fgsm(fwd, x, y, epsilon=float(eps))


def _cleverhans_pgd(suite, fwd, x, y, seed):
    c = suite.config
    return suite.attacks.cleverhans_pgd(fwd, x, y, epsilon=float(c.epsilon),
                                        num_steps=c.num_steps, step_size=float(c.step_size),
                                        random_start=c.random_start, seed=seed)


def _mim(suite, fwd, x, y, seed):
    c = suite.config
    return suite.attacks.mim(fwd, x, y, epsilon=float(c.epsilon), num_steps=c.num_steps,
                             step_size=float(c.step_size))


def _cw(suite, fwd, x, y, seed):
    s = suite.settings
    return suite.attacks.carlini_wagner_l2(fwd, x, y, num_steps=s.cw_steps,
                                           binary_search_steps=s.cw_search_steps)


def _deepfool(suite, fwd, x, y, seed):
    return suite.attacks.deepfool(fwd, x, y, num_steps=suite.settings.deepfool_iters)


def _make_shaping(suite, mode):
    del mode

    def attack(x, y, i):
        return suite.shaping_attack(x, y, seeds.row_start(suite.config, "shaping_attack", i))
    return attack


def _make_eot(suite, mode):
    tf, c, s, A = suite.tf, suite.config, suite.settings, suite.attacks
    fwd = suite.forward(mode)
    loss = A.LOSSES[c.loss_func]

    def attack(x, y, i):
        return A.eot_pgd(lambda z, draw: tf.reduce_sum(loss(fwd(z, i, draw), y)), x,
                         epsilon=c.epsilon, num_steps=c.num_steps, step_size=c.step_size,
                         eot_samples=s.eot_samples, random_start=c.random_start,
                         seed=seeds.row_start(c, "eot", i))
    return attack


def _eot_readings(settings) -> tuple:
    del settings
    return (FRESH_PATH,)


def _eot_label(c, s) -> str:
    if random_paths(c):
        return (f"EOT-{pgd_text(c)} through the column's inference mode, each gradient "
                f"averaged over {s.eot_samples} random paths")
    return (f"EOT-{pgd_text(c)} through BN+Shaping, each gradient averaged over "
            f"{s.eot_samples} reference draws")


def _eot_path_label(c, s) -> str:
    del c, s
    return ("on random paths: the paths of each step drawn from the row's seed (stream "
            "'eot'), independent of the classifying path; no single attack path, so no "
            "attack's-path cell")


def survivors_protocol(mode: str, config=None) -> bool:
    """Whether AutoAttack runs on survivors in column `mode`: only where an image's logits
    depend on that image alone (no batch statistics, no random draws; with `config`, not
    on random paths either)."""
    from madry_ns import inference

    m = inference.get(column_parts(mode)[0])
    return m.per_image and not m.draws and not (config is not None and random_paths(config))


def autoattack_params(settings):
    """The `attacks.AutoAttackParams` of `settings.autoattack` (not 'legacy'); 'rand' with
    `apgd_eot_samples` draws per gradient (AutoAttack's 20 unless set)."""
    import dataclasses

    from madry_ns import attacks

    s = settings
    if s.autoattack == "rand":
        return dataclasses.replace(attacks.version_params("rand"),
                                   apgd_eot_samples=s.apgd_eot_samples)
    if s.autoattack != "custom":
        return attacks.version_params(s.autoattack)
    return attacks.AutoAttackParams(
        attacks=tuple(s.autoattack_attacks), apgd_steps=s.apgd_steps,
        apgd_restarts=s.apgd_restarts, apgd_targets=s.apgd_targets, rho=s.apgd_rho,
        apgd_eot_samples=s.apgd_eot_samples, fab_steps=s.fab_steps,
        fab_restarts=s.fab_restarts, fab_targets=s.fab_targets, alpha_max=s.fab_alpha_max,
        eta=s.fab_eta, beta=s.fab_beta, square_queries=s.square_queries,
        p_init=s.square_p_init)


def _make_autoattack(suite, mode):
    c, s = suite.config, suite.settings
    # Generated through the attacker's forward, judged by the column's (the same forward off
    # random paths).
    fwd, judge = suite.attack_forward(mode), suite.forward(mode)
    if s.autoattack != "legacy":
        params = autoattack_params(s)
        survivors = survivors_protocol(mode, c)

        def run(x, y, i):
            result = suite.attacks.auto_attack(
                lambda z, draw=None: fwd(z, i, draw), x, y, epsilon=float(c.epsilon),
                params=params, survivors=survivors, classify_fn=lambda z: judge(z, i),
                seed=seeds.row_start(c, "autoattack", i))
            return result["x_adv"], result["robust"]
        return run

    def attack(x, y, i):
        result = suite.attacks.autoattack_style(
            lambda z: fwd(z, i), x, y, epsilon=float(c.epsilon), num_steps=s.apgd_steps,
            num_targets=s.apgd_targets, square_num_steps=s.square_queries,
            classify_fn=lambda z: judge(z, i), seed=seeds.row_start(c, "autoattack", i))
        return result["x_adv"], result["robust"]
    return attack


def _autoattack_eot(settings) -> int:
    """APGD-CE's and APGD-DLR's EOT draws in the autoattack row (1: none)."""
    if settings.autoattack == "legacy":
        return 1
    return autoattack_params(settings).apgd_eot_samples


def _autoattack_readings(settings) -> tuple:
    return (FRESH_PATH,) if _autoattack_eot(settings) > 1 else READINGS


def _autoattack_path_label(c, s) -> str:
    k = _autoattack_eot(s)
    if k == 1:
        return _one_path_label(c, s) + "; every attack's output judged on the column's path"
    return (f"on random paths: every APGD-CE/APGD-DLR gradient averaged over {k} random "
            f"paths, any other attack on the attacker's own path ({attacker_path_text()}); "
            f"every attack's output judged on the column's path; no single attack path, so "
            f"no attack's-path cell")


register(_pn_row(
    "fgsm", "FGSM", _fgsm, stream="fgsm",
    label=lambda c, s: f"FGSM eps {c.epsilon:g}, generated on PN (transfer; white-box in "
                       f"the PN column)"))
register(_pn_row(
    "fgsm16", "FGSM eps 16", lambda *a: _fgsm(*a, large=True), stream="fgsm16",
    label=lambda c, s: f"FGSM eps {s.fgsm_large_epsilon:g}, generated on PN (the paper's "
                       f"FGSM(16))",
    epsilon=lambda c, s: s.fgsm_large_epsilon))
register(_pn_row(
    "pgd", "PGD (CleverHans)", _cleverhans_pgd, stream="cleverhans_pgd",
    label=lambda c, s: f"CleverHans {pgd_text(c).replace(c.loss_func + ', ', 'xent, ')}, "
                       f"generated on PN"))
register(_pn_row(
    "mim", "MIM (CleverHans)", _mim, stream="mim",
    label=lambda c, s: f"CleverHans MIM-{c.num_steps} (eps {c.epsilon:g}, step "
                       f"{c.step_size:g}, decay 1.0), generated on PN"))
register(_pn_row(
    "cw", "CW-L2", _cw, stream="cw", norm="l2",
    label=lambda c, s: f"CW-L2 ({s.cw_search_steps} x {s.cw_steps} steps, unbounded L2), "
                       f"generated on PN"))
register(_pn_row(
    "deepfool", "DeepFool", _deepfool, stream="deepfool", norm="l2",
    label=lambda c, s: f"DeepFool ({s.deepfool_iters} iterations, 10 candidates, overshoot "
                       f"0.02, unbounded L2), generated on PN"))
register(Row(
    "shaping", "shaping attack", "shaping", _make_shaping, stream="shaping_attack",
    needs_toolkit_bn=True, paths=None,
    label=lambda c, s: f"shaping attack: {pgd_text(c)} through batch statistics, each group "
                       f"of 1/{s.shaping_groups} of the batch attacked beside the other "
                       f"clean test images"))
register(Row(
    "adaptive", "adaptive PGD", "own", lambda suite, mode: suite.pgd_through(mode),
    stream="suite_pgd",
    label=lambda c, s: f"{pgd_text(c)} through the column's own forward (PN: white-box; BN: "
                       f"the test batch's statistics; BN+Shaping: the very references the "
                       f"defense uses, the exact adaptive attack)"))
register(Row(
    "adaptive_other", "adaptive PGD, attacker's own references", "own",
    lambda suite, mode: suite.pgd_through(mode, other=True), stream="suite_pgd",
    modes=("shaped",), paths=None,
    label=lambda c, s: f"{pgd_text(c)} through BN+Shaping with the attacker's own reference "
                       f"draw (the paper's 'slightly weaker' adaptive attack)"))
register(Row(
    "eot", "EOT-PGD over reference draws", "own", _make_eot, stream="eot", modes=("shaped",),
    label=_eot_label, paths=_eot_readings, path_label=_eot_path_label,
    names=lambda c, s: ("EOT-PGD over random paths" if random_paths(c)
                        else "EOT-PGD over reference draws")))


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"


def _autoattack_parts(p) -> str:
    """Each attack of an `AutoAttackParams` with its parameters, in order."""
    apgd = f"{p.apgd_steps} steps, rho {p.rho:g}"
    fab = f"{p.fab_steps} steps, alpha_max {p.alpha_max:g}, eta {p.eta:g}, beta {p.beta:g}"
    eot = f", EOT over {p.apgd_eot_samples} draws" if p.apgd_eot_samples > 1 else ""
    untargeted = f"{apgd}, {_plural(p.apgd_restarts, 'restart')}{eot}"
    text = {
        "apgd-ce": f"APGD-CE ({untargeted})", "apgd-dlr": f"APGD-DLR ({untargeted})",
        "apgd-t": f"APGD-T ({apgd}, {_plural(p.apgd_targets, 'target class')})",
        "fab": f"FAB ({fab}, {_plural(p.fab_restarts, 'restart')})",
        "fab-t": f"FAB-T ({fab}, {_plural(p.fab_targets, 'target class')})",
        "square": f"Square ({p.square_queries} queries, p_init {p.p_init:g})"}
    return ", ".join(text[a] for a in p.attacks)


def _autoattack_label(c, s) -> str:
    if s.autoattack == "legacy":
        return (f"APGD-CE and APGD-T ({s.apgd_steps} steps each; {s.apgd_targets} "
                f"target class{'es' if s.apgd_targets > 1 else ''}), Square "
                f"({s.square_queries} queries), eps {c.epsilon:g}, through the "
                f"column's own forward on fixed batches (per image worst case; no "
                f"FAB-T)")
    survivors = [m for m in s.modes if survivors_protocol(m, c)]
    fixed = [m for m in s.modes if m not in survivors]
    protocol = "; ".join(
        part for part in (
            f"on survivors (each attack only on the images every earlier one failed on) in "
            f"{', '.join(survivors)}" if survivors else "",
            f"on fixed batches (every attack on the full clean batch, per image worst case) "
            f"in {', '.join(fixed)}" if fixed else "") if part)
    return (f"AutoAttack {s.autoattack}: {_autoattack_parts(autoattack_params(s))}, eps "
            f"{c.epsilon:g}, through the column's own forward; {protocol}")


register(Row(
    "autoattack", "AutoAttack-style (APGD-CE, APGD-T, Square)", "own", _make_autoattack,
    stream="autoattack", judged_by_attack=True, label=_autoattack_label,
    paths=_autoattack_readings, path_label=_autoattack_path_label,
    names=lambda c, s: ("AutoAttack-style (APGD-CE, APGD-T, Square)"
                        if s.autoattack == "legacy" else f"AutoAttack {s.autoattack}")))
