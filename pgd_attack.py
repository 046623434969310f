"""PGD attack file, as MadryLab/cifar10_challenge's pgd_attack.py: `python pgd_attack.py`.

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


def main(argv=None) -> int:
    return cli.run(cli.Parser("python pgd_attack.py", __doc__, write_attack_file), argv)


if __name__ == "__main__":
    sys.exit(main())
