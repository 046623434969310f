"""Madry's released models: `python fetch_model.py`, a shell of `python -m madry_ns.fetch_model`.

Kept where Madry's cifar10_challenge has it, so his commands run
unchanged. The command, its flags and its help are those of `madry_ns/fetch_model.py`.
"""

import sys

from madry_ns import fetch_model


def main(argv=None) -> int:
    return fetch_model.main(argv, prog="python fetch_model.py")


if __name__ == "__main__":
    sys.exit(main())
