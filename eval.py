"""Evaluation: `python eval.py`, a shell of `python -m madry_ns.eval`.

Kept where Madry's cifar10_challenge has it, so his commands run
unchanged. The command, its flags and its help are those of `madry_ns/eval.py`.
"""

import sys

from madry_ns import eval


def main(argv=None) -> int:
    return eval.main(argv, prog="python eval.py")


if __name__ == "__main__":
    sys.exit(main())
