"""Attack-file check and scoring, as MadryLab/cifar10_challenge's run_attack.py:
`python -m madry_ns.run_attack` (in a checkout, also `python run_attack.py`).

Loads store_adv_path and checks it in Madry's order and words (checkpoint, shape, pixel range
[0, 255], maximum perturbation <= epsilon, tolerance 1e-4), then prints `Accuracy: xx.xx%` of
the latest checkpoint in model_dir on it and saves the predictions to pred.npy (int64).
Beyond Madry: NaN/inf, non-numeric and pickled files are refused, and every refusal exits
with status 2 without writing pred.npy.
"""

import sys

from madry_ns import cli


def run_attack(config, args):
    from madry_ns import challenge

    challenge.run_attack(config)


def main(argv=None, prog: str = "python -m madry_ns.run_attack") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    return cli.run(cli.Parser(prog, __doc__, run_attack), argv)


if __name__ == "__main__":
    sys.exit(main())
