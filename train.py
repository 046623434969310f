"""Adversarial training, as MadryLab/cifar10_challenge's train.py: `python train.py`.

Reads ./config.json (or --config PATH, plus --set key=value overrides), trains, and writes
checkpoints, TensorBoard events and a copy of the config to model_dir. Running it again
resumes from the latest checkpoint in model_dir.
"""

from madry_ns import cli


def main(argv):
    del argv
    config = cli.load_config()
    from madry_ns import training

    training.train(config)


if __name__ == "__main__":
    cli.run(main)
