"""PGD attack file, as MadryLab/cifar10_challenge's pgd_attack.py:
`python -m madry_ns.pgd_attack` (in a checkout, also `python pgd_attack.py`).

Attacks the first num_eval_examples test images with the config's PGD against the latest
checkpoint in model_dir and saves them to store_adv_path (default attack.npy): float64,
(num_eval_examples, 32, 32, 3), 0-255, test order. Without a checkpoint it prints
`No model found` and exits with status 2 (Madry's exited 0).
"""

import sys

from madry_ns import cli


def write_attack_file(config, args):
    from madry_ns import challenge

    challenge.write_attack_file(config)


def main(argv=None, prog: str = "python -m madry_ns.pgd_attack") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    return cli.run(cli.Parser(prog, __doc__, write_attack_file), argv)


if __name__ == "__main__":
    sys.exit(main())
