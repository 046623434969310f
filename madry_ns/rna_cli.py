"""Evaluation of a random-path (RNA) model under four protocols: `python -m madry_ns.rna_eval`
(in a checkout, also `python rna_eval.py`).

(a) the paper's (attack one random path, classify on others), (b) a fixed path (attack and
classify on the same path), (c) EOT-PGD, (d) AutoAttack's 'rand' version with EOT; each
classification repeated on R fresh paths. Reads ./config.json (or --config PATH, plus --set
key=value overrides), evaluates the latest checkpoint in model_dir (or --checkpoint), prints a
table and appends one JSON line to model_dir/eval/rna_eval.jsonl (or --output). See
`madry_ns.rna_eval`.
"""

# This command line lives apart from madry_ns.rna_eval, which imports TensorFlow at once, so
# that a bad config fails before TensorFlow loads (madry_ns.cli), as every command's does.

from madry_ns import cli


def evaluate(config, args):
    from madry_ns import rna_eval

    chosen = {"protocols": args.protocols or None, "repeats": args.repeats,
              "eot_samples": args.eot_samples, "apgd_steps": args.apgd_steps}
    settings = rna_eval.Settings(**{k: v for k, v in chosen.items() if v is not None})
    rna_eval.evaluate_checkpoint(config, args.checkpoint, settings, args.output)


def main(argv=None, prog: str = "python -m madry_ns.rna_eval") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    parser = cli.Parser(prog, __doc__, evaluate)  # unset: Settings' defaults
    add = parser.add_argument
    add("--checkpoint", metavar="PREFIX", help="default: the latest in model_dir")
    add("--protocols", type=cli.comma_list, help="comma-separated, among paper, fixed, eot, "
        "aa_eot (default: all)")
    add("--repeats", type=int, help="R: fresh random paths per classification (default 10)")
    add("--eot_samples", type=int, help="K: random paths per EOT gradient (default 20)")
    add("--apgd_steps", type=int, help="APGD iterations (default 100)")
    add("--output", metavar="PATH", help="JSON lines file the result is appended to "
        "(default model_dir/eval/rna_eval.jsonl)")
    return cli.run(parser, argv)

