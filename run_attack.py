"""Attack-file check and scoring: `python run_attack.py`, a shell
of `python -m madry_ns.run_attack`.

Kept where Madry's cifar10_challenge has it, so his commands run
unchanged. The command, its flags and its help are those of `madry_ns/run_attack.py`.
"""

import sys

from madry_ns import run_attack


def main(argv=None) -> int:
    return run_attack.main(argv, prog="python run_attack.py")


if __name__ == "__main__":
    sys.exit(main())
