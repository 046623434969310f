"""Result tables from evaluation records (any model, any run), and the `bn` command.

    python -m madry_ns.analysis table models/run_a/eval/metrics.jsonl models/run_b/eval/...

prints a Markdown table: one row per run (model_dir), one column pair (clean, PGD) per
distinct (inference, attack) label, using the latest record of each.

    python -m madry_ns.analysis bn models/normal models/adv models/bn_params \
        --labels NORMAL ADV "BN PARAMS" --output results/bn

runs the fragile-features study's folded-BN analysis (its Figures 1 and 2), which lives in
`madry_ns.studies.fragile_bn` (see there for the files it writes); its names stay importable
from here.
"""


from __future__ import annotations

import json
import os
import sys



def read_records(paths: list[str]) -> list[dict]:
    """Every JSON line of the given metrics files, each tagged with its run name."""
    records = []
    for path in paths:
        run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    records.append({**json.loads(line), "run": run})
    return records


def metrics_table(records: list[dict]) -> str:
    """Markdown: one row per evaluation setting (inference, how the attack was generated), one
    column per run, each cell `clean / robust` accuracy in %; the latest record of each."""
    runs, settings, cells = [], [], {}
    for r in records:
        key = (r.get("inference_short", r["inference"]), r.get("attack_short", r["attack"]))
        if r["run"] not in runs:
            runs.append(r["run"])
        if key not in settings:
            settings.append(key)
        cells[(r["run"], key)] = r
    lines = ["| inference | PGD generated | " + " | ".join(runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for key in settings:
        values = []
        for run in runs:
            c = cells.get((run, key))
            values.append(f"{100 * c['natural_accuracy']:.2f} / "
                          f"{100 * c['adversarial_accuracy']:.2f}" if c else "")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(values) + " |")
    attacks = sorted({r["attack"].split(")")[0] + ")" for r in records})
    n = sorted({r.get("num_examples") for r in records})
    lines += ["", f"Cells: clean / robust accuracy in %, on {', '.join(map(str, n))} test "
              f"examples; attack: {'; '.join(attacks)}."]
    return "\n".join(lines)

# The folded-BN analysis under its old import path (it is the fragile-features study's).
from madry_ns.studies.fragile_bn import (BN_VARIABLES, CHANNEL_FIELDS,  # noqa: E402,F401
                                         LAYER_FIELDS, bn_analysis, bn_layer_name, folded_bn,
                                         layer_statistics, mean_m_difference, run_bn)


def main(argv=None) -> int:
    from madry_ns import cli

    parser = cli.Parser("python -m madry_ns.analysis", __doc__, config=False)
    sub = parser.add_subparsers()
    what = "Markdown table from eval metrics.jsonl files"
    table = sub.add_parser("table", help=what, doc=what, main=_table_main, config=False)
    table.add_argument("metrics", nargs="+", help="model_dir/eval/metrics.jsonl files")
    what = "folded BN weights m, b per layer: CSV, PNG, TensorBoard"
    bn = sub.add_parser("bn", help=what, doc=what, main=_bn_main, config=False,
                        tensorflow=True)
    bn.add_argument("models", nargs="+", help="model_dirs (latest checkpoint) or checkpoint "
                    "prefixes, ours or Madry's")
    bn.add_argument("--labels", nargs="+", help="one name per model (default: folder names)")
    bn.add_argument("--output", required=True, help="folder for the CSV, PNG and event files")
    bn.add_argument("--reference", help="label the differences are taken against (default: "
                    "the first model)")
    return cli.run(parser, argv)


def _table_main(args) -> None:
    from madry_ns.errors import UserError

    missing = [p for p in args.metrics if not os.path.isfile(p)]
    if missing:
        raise UserError(f"no such metrics file: {', '.join(missing)}")
    print(metrics_table(read_records(args.metrics)))


def _bn_main(args) -> None:
    from madry_ns.errors import UsageError

    try:
        run_bn(args.models, args.labels, args.output, args.reference)
    except ValueError as e:  # labels or architectures that do not fit together
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
