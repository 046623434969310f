"""Evaluation, as MadryLab/cifar10_challenge's eval.py: `python -m madry_ns.eval`
(in a checkout, also `python eval.py`).

Watches model_dir and evaluates every new latest checkpoint (natural and PGD accuracy),
printing Madry's lines and writing TensorBoard summaries to model_dir/eval. Beyond Madry:
--once evaluates the latest checkpoint and exits; --checkpoint PATH evaluates that one; each
evaluation appends one JSON line to model_dir/eval/metrics.jsonl. Madry's TF1 checkpoints
(fetch_model.py) are read as they are.
"""

import sys

from madry_ns import cli


def evaluate(config, args):
    import tensorflow as tf

    from madry_ns import data, evaluation
    from madry_ns.models import build_model

    dataset = data.load_dataset(config)
    device = "/cpu:0" if config.eval_on_cpu else None
    with tf.device(device):
        model = build_model(config)
        evaluation.watch(config, model, dataset, once=args.once, checkpoint=args.checkpoint)


def main(argv=None, prog: str = "python -m madry_ns.eval") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    parser = cli.Parser(prog, __doc__, evaluate)
    parser.add_argument("--once", action="store_true",
                        help="evaluate the latest checkpoint and exit")
    parser.add_argument("--checkpoint", metavar="PREFIX",
                        help="evaluate this checkpoint prefix and exit")
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
