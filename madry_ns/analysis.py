"""Result tables from evaluation records (`model_dir/eval/metrics.jsonl`).

    python -m madry_ns.analysis table models/run_a/eval/metrics.jsonl models/run_b/eval/...

prints a Markdown table: one row per run (model_dir), one column pair (clean, PGD) per
distinct (inference, attack) label, using the latest record of each.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m madry_ns.analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="Markdown table from eval metrics.jsonl files")
    table.add_argument("metrics", nargs="+", help="model_dir/eval/metrics.jsonl files")
    args = parser.parse_args(argv)
    if args.command == "table":
        missing = [p for p in args.metrics if not os.path.isfile(p)]
        if missing:
            print(f"error: no such metrics file: {', '.join(missing)}", file=sys.stderr)
            return 2
        print(metrics_table(read_records(args.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
