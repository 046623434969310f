"""Adversarial training, as MadryLab/cifar10_challenge's train.py: `python -m madry_ns.train`
(in a checkout, also `python train.py`).

Reads ./config.json (or --config PATH, plus --set key=value overrides), trains, and writes
checkpoints, TensorBoard events and a copy of the config to model_dir. Running it again
resumes from the latest checkpoint in model_dir.
"""

import sys

from madry_ns import cli


def train(config, args):
    from madry_ns import training

    training.train(config)


def main(argv=None, prog: str = "python -m madry_ns.train") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    return cli.run(cli.Parser(prog, __doc__, train), argv)


if __name__ == "__main__":
    sys.exit(main())
