"""Adversarial training: `python train.py`, a shell of `python -m madry_ns.train`.

Kept where Madry's cifar10_challenge has it, so his commands run
unchanged. The command, its flags and its help are those of `madry_ns/train.py`.
"""

import sys

from madry_ns import train


def main(argv=None) -> int:
    return train.main(argv, prog="python train.py")


if __name__ == "__main__":
    sys.exit(main())
