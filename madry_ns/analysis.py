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
    """Markdown: rows = runs, columns = evaluation settings (clean and PGD accuracy, %)."""
    runs, settings, cells = [], [], {}
    for r in records:
        key = (r["inference"], r["attack"])
        if r["run"] not in runs:
            runs.append(r["run"])
        if key not in settings:
            settings.append(key)
        cells[(r["run"], key)] = r  # the latest record wins
    lines = ["| setting | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for key in settings:
        inference, attack = key
        clean = [f"{100 * cells[(run, key)]['natural_accuracy']:.2f}"
                 if (run, key) in cells else "" for run in runs]
        robust = [f"{100 * cells[(run, key)]['adversarial_accuracy']:.2f}"
                  if (run, key) in cells else "" for run in runs]
        lines.append(f"| clean, inference {inference} | " + " | ".join(clean) + " |")
        lines.append(f"| {attack}, classified {inference} | " + " | ".join(robust) + " |")
    n = {r.get("num_examples") for r in records}
    lines.append("")
    lines.append(f"Accuracy in %, on {', '.join(str(v) for v in sorted(n))} test examples.")
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
