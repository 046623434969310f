"""Evaluation of a random-path (RNA) model under four protocols: `python rna_eval.py`.

(a) the paper's (attack one random path, classify on others), (b) a fixed path (attack and
classify on the same path), (c) EOT-PGD, (d) AutoAttack's 'rand' version with EOT; each
classification repeated on R fresh paths. Reads ./config.json (or --config PATH, plus --set
key=value overrides), evaluates the latest checkpoint in model_dir (or --checkpoint), prints a
table and appends one JSON line to model_dir/eval/rna_eval.jsonl (or --output). See
`madry_ns.rna_eval`.
"""

from absl import flags

from madry_ns import cli

# Defaults (None) are madry_ns.rna_eval.Settings': all protocols, R 10, K 20, APGD 100 steps.
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (default: the latest in model_dir).")
flags.DEFINE_list("protocols", None, "Protocols to run, among paper, fixed, eot, aa_eot "
                  "(default: all).")
flags.DEFINE_integer("repeats", None, "R: fresh random paths per classification (default 10).")
flags.DEFINE_integer("eot_samples", None, "K: random paths per EOT gradient, EOT-PGD and APGD "
                     "(default 20).")
flags.DEFINE_integer("apgd_steps", None, "APGD iterations (default 100).")
flags.DEFINE_string("output", None, "JSON lines file to append the result to (default "
                    "model_dir/eval/rna_eval.jsonl).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = cli.load_config()
    from madry_ns import rna_eval

    chosen = {"protocols": tuple(FLAGS.protocols) if FLAGS.protocols else None,
              "repeats": FLAGS.repeats, "eot_samples": FLAGS.eot_samples,
              "apgd_steps": FLAGS.apgd_steps}
    settings = rna_eval.Settings(**{k: v for k, v in chosen.items() if v is not None})
    rna_eval.evaluate_checkpoint(config, FLAGS.checkpoint, settings, FLAGS.output)


if __name__ == "__main__":
    cli.run(main)
