"""RNA's four evaluation protocols: `python rna_eval.py`, a shell of `python -m madry_ns.rna_eval`.

Kept beside Madry's scripts. The command, its flags and its help are those of `madry_ns/rna_cli.py`.
"""

import sys

from madry_ns import rna_cli


def main(argv=None) -> int:
    return rna_cli.main(argv, prog="python rna_eval.py")


if __name__ == "__main__":
    sys.exit(main())
