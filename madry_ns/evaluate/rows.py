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


def columns() -> tuple:
    """Every column the suite can run: COLUMNS, then modes registered beyond them."""
    from madry_ns import inference

    return COLUMNS + tuple(k for k in inference.MODES if k not in COLUMNS)


def canonical_modes(modes) -> tuple:
    """`modes` in the config's vocabulary ('pn' -> 'population', 'bn' -> 'batch')."""
    from madry_ns import inference

    return tuple(inference.ALIASES.get(m, m) for m in modes)


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

    def has_cell(self, mode: str) -> bool:
        """Whether the row is run under column `mode`."""
        return self.modes is None or mode in self.modes

    def is_transfer_in(self, mode: str) -> bool:
        """Whether the row's examples were made on another forward than column `mode`'s."""
        return self.generation not in ("own", mode)


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
        pn = suite.forward("population")
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


def survivors_protocol(mode: str) -> bool:
    """Whether AutoAttack runs on survivors in column `mode`: only where an image's logits
    depend on that image alone (no batch statistics, no random draws)."""
    from madry_ns import inference

    m = inference.get(mode)
    return m.per_image and not m.draws


def autoattack_params(settings):
    """The `attacks.AutoAttackParams` of `settings.autoattack` (not 'legacy')."""
    from madry_ns import attacks

    s = settings
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
    fwd = suite.forward(mode)
    if s.autoattack != "legacy":
        params = autoattack_params(s)
        survivors = survivors_protocol(mode)

        def run(x, y, i):
            result = suite.attacks.auto_attack(
                lambda z, draw=None: fwd(z, i, draw), x, y, epsilon=float(c.epsilon),
                params=params, survivors=survivors, classify_fn=lambda z: fwd(z, i),
                seed=seeds.row_start(c, "autoattack", i))
            return result["x_adv"], result["robust"]
        return run

    def attack(x, y, i):
        result = suite.attacks.autoattack_style(
            lambda z: fwd(z, i), x, y, epsilon=float(c.epsilon), num_steps=s.apgd_steps,
            num_targets=s.apgd_targets, square_num_steps=s.square_queries,
            seed=seeds.row_start(c, "autoattack", i))
        return result["x_adv"], result["robust"]
    return attack


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
    needs_toolkit_bn=True,
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
    modes=("shaped",),
    label=lambda c, s: f"{pgd_text(c)} through BN+Shaping with the attacker's own reference "
                       f"draw (the paper's 'slightly weaker' adaptive attack)"))
register(Row(
    "eot", "EOT-PGD over reference draws", "own", _make_eot, stream="eot", modes=("shaped",),
    label=lambda c, s: f"EOT-{pgd_text(c)} through BN+Shaping, each gradient averaged over "
                       f"{s.eot_samples} reference draws"))
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
    survivors = [m for m in s.modes if survivors_protocol(m)]
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
    names=lambda c, s: ("AutoAttack-style (APGD-CE, APGD-T, Square)"
                        if s.autoattack == "legacy" else f"AutoAttack {s.autoattack}")))
