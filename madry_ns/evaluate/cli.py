"""The suite's command line: `python -m madry_ns.evaluate [ablation | compare] ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from madry_ns import config as config_lib
from madry_ns.errors import ConfigError
from madry_ns.evaluate import reports, suite
from madry_ns.evaluate.ablation import ABLATION_RATIOS, run_ablation
from madry_ns.evaluate.rows import ROW



def _compare_main(argv: list) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m madry_ns.evaluate compare",
        description="Two finished suites on the same images, image by image")
    parser.add_argument("suites", nargs=2, metavar="OUTPUT_DIR",
                        help="two folders written by python -m madry_ns.evaluate --output")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="the two models' names")
    parser.add_argument("--output", help="also write compare.md and compare.json here")
    args = parser.parse_args(argv)
    from madry_ns.cli import report_user_errors

    def go(_):
        from madry_ns import files

        result = reports.compare(*args.suites, names=tuple(args.names))
        text = reports.compare_markdown(result)
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            files.atomic_write_text(os.path.join(args.output, "compare.json"),
                                    json.dumps(result, indent=2) + "\n")
            files.atomic_write_text(os.path.join(args.output, "compare.md"), text)
        print(text, end="")

    report_user_errors(go, [])
    return 0



def _csv(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    command = "python -m madry_ns.evaluate " + " ".join(argv)
    ablation_mode = bool(argv) and argv[0] == "ablation"
    parser = argparse.ArgumentParser(
        prog="python -m madry_ns.evaluate" + (" ablation" if ablation_mode else ""),
        description=("Table IV: checkpoints x inference ratios" if ablation_mode else
                     "Every attack under BN, PN and BN+Shaping inference, with sanity checks"))
    parser.add_argument("--config", default="config.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--num_examples", type=int, help="first N test images "
                        "(default: num_eval_examples)")
    parser.add_argument("--batch_size", type=int, help="default: eval_batch_size")
    parser.add_argument("--seed", type=int, help="attack seed (default: np_random_seed)")
    parser.add_argument("--output", help="output folder (default model_dir/eval/suite-STEP)")
    if ablation_mode:
        parser.add_argument("--checkpoints", nargs="+", required=True,
                            help="one checkpoint (or model_dir) per training ratio")
        parser.add_argument("--labels", nargs="+", required=True,
                            help="one row name per checkpoint, e.g. 1:1 1:2 1:3 1:7")
        parser.add_argument("--ratios", type=_csv, default=tuple(map(str, ABLATION_RATIOS)),
                            help="inference ratios r of 1:r (default 0,1,3,9,19,49)")
    else:
        defaults = suite.Settings()
        parser.add_argument("--checkpoint", help="default: the latest in model_dir")
        parser.add_argument("--attacks", type=_csv, default=defaults.attacks,
                            help=f"comma-separated, among {','.join(ROW)} (default: all)")
        parser.add_argument("--modes", type=_csv, default=defaults.modes,
                            help="inference columns among bn,pn,shaped (default: all)")
        for name in suite.INT_SETTINGS:
            parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
        parser.add_argument("--no_sanity", action="store_true",
                            help="skip the gradient-masking checks")
        parser.add_argument("--resume", action="store_true",
                            help="keep the rows already in --output (same checkpoint and "
                                 "settings) and run only the rest")
    args = parser.parse_args(argv[1:] if ablation_mode else argv)
    from madry_ns.cli import import_tensorflow_quietly, report_user_errors

    def go(_):
        overrides = list(args.set)
        for key, value in (("num_eval_examples", args.num_examples),
                           ("eval_batch_size", args.batch_size),
                           ("np_random_seed", args.seed)):
            if value is not None:
                overrides.append(f"{key}={value}")
        config = config_lib.load(args.config, overrides)
        if ablation_mode:
            ratios = []
            for r in args.ratios:
                if not r.isdigit():
                    raise ConfigError(f"--ratios {r}: expected non-negative integers r of 1:r")
                ratios.append(int(r))
            import_tensorflow_quietly()
            run_ablation(config, args.checkpoints, args.labels, ratios,
                         args.output or os.path.join(config.model_dir, "eval", "ablation"),
                         command)
            return
        settings = suite.Settings(attacks=args.attacks, modes=args.modes,
                                  **{k: getattr(args, k) for k in suite.INT_SETTINGS},
                                  sanity=not args.no_sanity)
        suite.check_modes(config, settings.modes)
        import_tensorflow_quietly()
        suite.run(config, settings, args.checkpoint, args.output, command, resume=args.resume)

    report_user_errors(go, [])
    return 0

