"""The old import name of APGD, Square and the AutoAttack-style ensemble.

They live in the package `madry_ns.attacks` (`auto_pgd`, `square_attack`, `autoattack`,
`losses`); this module re-exports their public names so that `from madry_ns import
autoattack; autoattack.apgd(...)` keeps working. New code: `from madry_ns import attacks`.
"""

from madry_ns.attacks.auto_pgd import apgd, apgd_single_run, apgd_targeted
from madry_ns.attacks.autoattack import ATTACKS, autoattack_style
from madry_ns.attacks.losses import dlr_loss, dlr_loss_targeted
from madry_ns.attacks.square_attack import SQUARE_P_HALVINGS, square, square_p

__all__ = ["ATTACKS", "SQUARE_P_HALVINGS", "apgd", "apgd_single_run", "apgd_targeted",
           "autoattack_style", "dlr_loss", "dlr_loss_targeted", "square", "square_p"]
