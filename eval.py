"""Evaluation, as MadryLab/cifar10_challenge's eval.py: `python eval.py`.

Watches model_dir and evaluates every new latest checkpoint (natural and PGD accuracy),
printing Madry's lines and writing TensorBoard summaries to model_dir/eval. Beyond Madry:
--once evaluates the latest checkpoint and exits; --checkpoint PATH evaluates that one; each
evaluation appends one JSON line to model_dir/eval/metrics.jsonl. Madry's TF1 checkpoints
(fetch_model.py) are read as they are.
"""

from absl import flags

from madry_ns import cli

flags.DEFINE_bool("once", False, "Evaluate the latest checkpoint and exit.")
flags.DEFINE_string("checkpoint", None, "Evaluate this checkpoint prefix and exit.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = cli.load_config()
    import tensorflow as tf

    from madry_ns import data, evaluation
    from madry_ns.models import build_model

    dataset = data.load_dataset(config)
    device = "/cpu:0" if config.eval_on_cpu else None
    with tf.device(device):
        model = build_model(config)
        evaluation.watch(config, model, dataset, once=FLAGS.once, checkpoint=FLAGS.checkpoint)


if __name__ == "__main__":
    cli.run(main)
