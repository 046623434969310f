"""The PGD attack file: `python pgd_attack.py`, a shell of `python -m madry_ns.pgd_attack`.

Kept where Madry's cifar10_challenge has it, so his commands run
unchanged. The command, its flags and its help are those of `madry_ns/pgd_attack.py`.
"""

import sys

from madry_ns import pgd_attack


def main(argv=None) -> int:
    return pgd_attack.main(argv, prog="python pgd_attack.py")


if __name__ == "__main__":
    sys.exit(main())
