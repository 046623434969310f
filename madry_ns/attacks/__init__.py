"""Attacks on Madry's 0-255 pixel scale, one attack family per module (CleverHans' layout).

Module            Attack (paper; reference code)
----------------  -----------------------------------------------------------------------
`utils`           shared helpers: pixel box, budget checks, seed folding, `compile_attack`
`losses`          xent, Madry's CW margin, DLR, targeted DLR; the `LOSSES` registry
`madry_pgd`       `pgd`, `pgd_attack`: L-inf PGD (Madry et al. 2018; cifar10_challenge)
`cleverhans_tf2`  `fgsm`, `cleverhans_pgd`, `mim` (Goodfellow et al. 2015, Madry et al. 2018,
                  Dong et al. 2018) by calling CleverHans 4's tf2 attacks
`deep_fool`       `deepfool`, L2 (Moosavi-Dezfooli et al. 2016; CleverHans v3 `DeepFool`)
`carlini_wagner`  `carlini_wagner_l2` (Carlini & Wagner 2017; nn_robust_attacks)
`eot`             `eot_pgd`: PGD over random draws (Athalye et al. 2018; obfuscated-gradients)
`auto_pgd`        `apgd`, `apgd_targeted`: APGD-CE/-DLR/-T (Croce & Hein 2020; auto-attack)
`fast_adaptive_boundary`
                  `fab`: FAB and FAB-T, L-inf (Croce & Hein 2020; auto-attack `fab_base.py`)
`square_attack`   `square`, L-inf (Andriushchenko et al. 2020; auto-attack `square.py`)
`autoattack`      `auto_attack`: the versions standard/plus/rand/custom; `auto_attack_survivors`:
                  the official protocol over a whole set; `autoattack_style`: the earlier
                  ensemble (Croce & Hein 2020; auto-attack)

Calling convention. An attack is a plain function of `(logits_fn, x, y, **params)` or, for
the two that ascend any loss (`pgd`, `eot_pgd`), of `(loss_fn, x, **params)`; Madry's
`pgd_attack(model, x, y, ...)` takes the model. Images are float on the 0-255 scale, labels
integers; the result is x_adv for the whole batch, which is never split or shrunk (a model
normalizing with batch statistics classifies an image differently in another batch). The
caller's `logits_fn` decides the BN mode, shaping and random paths. Iterations are
`num_steps` in every attack; losses are named by `LOSSES`' keys ("xent", "cw", "dlr").
Randomness is stateless from an explicit `seed` (two integers), so the same seed repeats a
run, which is what makes a resumed evaluation repeat an uninterrupted one. Loops are
`tf.while_loop`s, so an attack traces into one `tf.function` (`compile_attack`, or
`compile_pgd` for the config's PGD) whose graph does not grow with `num_steps`.

Every public name is re-exported here: `from madry_ns import attacks; attacks.pgd(...)`.
The modules are named apart from the functions they define so that `attacks.pgd` is
always the function. `madry_ns.autoattack` is the old import name of APGD, Square and the
ensemble. Why DeepFool and CW are our own and how APGD, Square and the ensemble differ from
AutoAttack: docs/attacks_choice.md and `madry_ns.attacks.autoattack`.
"""

from madry_ns.attacks.auto_pgd import APGD_LOSSES, apgd, apgd_single_run, apgd_targeted
from madry_ns.attacks.autoattack import (ATTACKS, AUTOATTACK_ATTACKS, VERSIONS,
                                         AutoAttackParams, auto_attack,
                                         auto_attack_survivors, autoattack_style,
                                         survivors_runner, version_params)
from madry_ns.attacks.carlini_wagner import carlini_wagner_l2
from madry_ns.attacks.cleverhans_tf2 import cleverhans_patched, cleverhans_pgd, fgsm, mim
from madry_ns.attacks.deep_fool import deepfool
from madry_ns.attacks.eot import eot_pgd
from madry_ns.attacks.fast_adaptive_boundary import fab, fab_single_run, linf_projection
from madry_ns.attacks.losses import (LOSSES, cw_loss, dlr_loss, dlr_loss_targeted, get_loss,
                                     xent_loss)
from madry_ns.attacks.madry_pgd import compile_pgd, config_params, linf_ascent, pgd, pgd_attack
from madry_ns.attacks.square_attack import SQUARE_P_HALVINGS, square, square_p
from madry_ns.attacks.utils import (PIXEL_MAX, PIXEL_MIN, check_count, check_epsilon,
                                    check_linf, check_params, compile_attack, fold_seed,
                                    int64_labels, linf_box, per_image, uniform_per_image)

__all__ = [
    "APGD_LOSSES", "ATTACKS", "AUTOATTACK_ATTACKS", "AutoAttackParams", "LOSSES", "PIXEL_MAX",
    "PIXEL_MIN", "SQUARE_P_HALVINGS", "VERSIONS", "apgd", "apgd_single_run", "apgd_targeted",
    "auto_attack", "auto_attack_survivors", "autoattack_style", "carlini_wagner_l2", "check_count",
    "check_epsilon", "check_linf", "check_params", "cleverhans_patched", "cleverhans_pgd",
    "compile_attack", "compile_pgd", "config_params", "cw_loss", "deepfool", "dlr_loss",
    "dlr_loss_targeted", "eot_pgd", "fab", "fab_single_run", "fgsm", "fold_seed", "get_loss",
    "int64_labels", "linf_ascent", "linf_box", "linf_projection", "mim", "per_image", "pgd",
    "pgd_attack", "square", "square_p", "survivors_runner", "uniform_per_image", "version_params",
    "xent_loss",
]
