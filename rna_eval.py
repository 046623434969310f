"""Evaluation of a random-path (RNA) model under four protocols: `python rna_eval.py`.

(a) the paper's (attack one random path, classify on others), (b) a fixed path (attack and
classify on the same path), (c) EOT-PGD, (d) AutoAttack's 'rand' version with EOT; each
classification repeated on R fresh paths. Reads ./config.json (or --config PATH, plus --set
key=value overrides), evaluates the latest checkpoint in model_dir (or --checkpoint), prints a
table and appends one JSON line to model_dir/eval/rna_eval.jsonl (or --output). The study's
code is `madry_ns.studies.rna` (also importable as `madry_ns.rna_eval`).
"""

import sys


def main(argv=None) -> int:
    from madry_ns.studies import rna

    return rna.main(argv, prog="python rna_eval.py")


if __name__ == "__main__":
    sys.exit(main())
