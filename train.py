"""Adversarial training, as MadryLab/cifar10_challenge's train.py: `python train.py`.

Reads ./config.json (or --config PATH, plus --set key=value overrides), trains, and writes
checkpoints, TensorBoard events and a copy of the config to model_dir. Running it again
resumes from the latest checkpoint in model_dir.
"""

import sys

from madry_ns import cli


def train(config, args):
    from madry_ns import training

    training.train(config)


def main(argv=None) -> int:
    return cli.run(cli.Parser("python train.py", __doc__, train), argv)


if __name__ == "__main__":
    sys.exit(main())
