"""The suite's command line, in the one convention of `madry_ns.cli`:

    python -m madry_ns.evaluate --config CONFIG [--checkpoint PATH] [--attacks ...] [--modes ...]
    python -m madry_ns.evaluate ablation --config CONFIG --checkpoints A B ... --labels ...
    python -m madry_ns.evaluate compare OUTPUT_DIR_A OUTPUT_DIR_B [--names A B]
    python -m madry_ns.evaluate robustbench OUTPUT_DIR --name ... --authors ... --link ...

The bare command is the suite, so the command is chosen from the first argument (argparse has
no default subcommand); each has its own `--help`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from madry_ns import cli
from madry_ns.evaluate import reports, suite
from madry_ns.evaluate.rows import AUTOATTACK_NAMES, AUTOATTACK_VERSIONS, ROW

PROG = "python -m madry_ns.evaluate"
_INT_HELP = {"apgd_eot_samples": "EOT draws per APGD-CE/APGD-DLR gradient in --autoattack rand "
                                 "(default 20, as AutoAttack) and custom (default 1)",
             "eot_samples": "draws per gradient of the EOT-PGD row (BN+Shaping references, "
                            "RNA paths)"}


def common_flags(parser: cli.Parser) -> None:
    """The flags the suite and the ablation share (each stands for a config key)."""
    parser.add_override("--num_examples", "num_eval_examples", type=int,
                        help="first N test images (default: num_eval_examples)")
    parser.add_override("--batch_size", "eval_batch_size", type=int,
                        help="default: eval_batch_size")
    parser.add_override("--seed", "np_random_seed", type=int,
                        help="attack seed (default: np_random_seed)")
    parser.add_argument("--output", help="output folder (default model_dir/eval/suite-STEP, "
                                         "or model_dir/eval/ablation)")


def _settings(args, config) -> suite.Settings:
    modes = suite.default_modes(config) if args.modes is None else args.modes
    return suite.Settings(attacks=args.attacks, modes=modes,
                          **{k: getattr(args, k) for k in suite.INT_SETTINGS},
                          **{k: getattr(args, k) for k in suite.FLOAT_SETTINGS},
                          autoattack=args.autoattack,
                          autoattack_attacks=args.autoattack_attacks,
                          sanity=not args.no_sanity)


def _modes(text: str) -> tuple:
    """--modes: comma-separated columns, the earlier names 'bn'/'pn' read with a notice."""
    from madry_ns.evaluate.rows import canonical_modes

    given = cli.comma_list(text)
    modes = canonical_modes(given)
    for old, new in zip(given, modes):
        if old != new:
            print(f"note: --modes {old} is now {new}", file=sys.stderr)
    return modes


def _suite_parser(command: str) -> cli.Parser:
    def check(config, args):
        suite.check_modes(config, _settings(args, config).modes)

    def main(config, args):
        suite.run(config, _settings(args, config), args.checkpoint, args.output, command,
                  resume=args.resume)

    parser = cli.Parser(PROG, "Every attack under BN, PN and BN+Shaping inference, with "
                              "sanity checks.", main, check=check)
    common_flags(parser)
    defaults = suite.Settings()
    parser.add_argument("--checkpoint", help="default: the latest in model_dir")
    parser.add_argument("--attacks", type=cli.comma_list, default=defaults.attacks,
                        help=f"comma-separated, among {','.join(ROW)} (default: all)")
    parser.add_argument("--modes", type=_modes, default=None,
                        help="inference columns among batch,population,shaped (default: all; "
                             "RNA models: batch,population, each read on a fresh path and on "
                             "the attack's path; the earlier bn, pn still work)")
    unset = {f.name: f.default for f in dataclasses.fields(suite.Settings)}
    for name in suite.INT_SETTINGS:
        # Unset keeps the field's own default (apgd_eot_samples: the version's).
        parser.add_argument(f"--{name}", type=int, default=unset[name],
                            help=_INT_HELP.get(name))
    for name in suite.FLOAT_SETTINGS:
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--autoattack", default=defaults.autoattack,
                        help=f"the autoattack row's version among "
                             f"{','.join(AUTOATTACK_VERSIONS)} (default {defaults.autoattack}: "
                             f"the APGD-CE + APGD-T + Square ensemble the recorded results "
                             f"used; standard: the official one, with FAB-T)")
    parser.add_argument("--autoattack_attacks", type=cli.comma_list,
                        default=defaults.autoattack_attacks,
                        help=f"--autoattack custom's attacks, in order, among "
                             f"{','.join(AUTOATTACK_NAMES)}")
    parser.add_argument("--no_sanity", action="store_true",
                        help="skip the gradient-masking checks")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --output (same checkpoint and "
                             "settings) and run only the rest")
    return parser


def _compare_parser() -> cli.Parser:
    def main(args):
        from madry_ns import files

        result = reports.compare(*args.suites, names=tuple(args.names))
        text = reports.compare_markdown(result)
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            files.atomic_write_text(os.path.join(args.output, "compare.json"),
                                    json.dumps(result, indent=2) + "\n")
            files.atomic_write_text(os.path.join(args.output, "compare.md"), text)
        print(text, end="")

    parser = cli.Parser(f"{PROG} compare", "Two finished suites on the same images, image by "
                                           "image.", main, config=False)
    parser.add_argument("suites", nargs=2, metavar="OUTPUT_DIR",
                        help=f"two folders written by {PROG} --output")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="the two models' names")
    parser.add_argument("--output", help="also write compare.md and compare.json here")
    return parser


def _robustbench_parser() -> cli.Parser:
    def main(args):
        from madry_ns.evaluate.api import Result

        meta = {k: getattr(args, k) for k in ("name", "authors", "link", "venue",
                                               "architecture", "dataset", "reported",
                                               "column", "footnote")}
        info = Result.load(args.suite).robustbench(
            args.output or os.path.join(args.suite, "robustbench.json"),
            additional_data=args.additional_data,
            number_forward_passes=args.number_forward_passes, **meta)
        print(json.dumps(info, indent=2))

    parser = cli.Parser(f"{PROG} robustbench", "A finished suite as RobustBench's model-info "
                                               "file (its deterministic per-image column).",
                        main, config=False)
    parser.add_argument("suite", metavar="OUTPUT_DIR", help=f"a folder written by {PROG}")
    for name in ("name", "authors", "link", "venue", "architecture"):
        parser.add_argument(f"--{name}", required=True, help=f"the paper's {name}")
    parser.add_argument("--dataset", default="cifar10", help="RobustBench's dataset name")
    parser.add_argument("--reported", default="", help="the paper's robust accuracy in %%")
    parser.add_argument("--additional_data", action="store_true",
                        help="the model was trained with extra data")
    parser.add_argument("--number_forward_passes", type=int, default=1)
    parser.add_argument("--column", default="population",
                        help="the suite column to report (default population)")
    parser.add_argument("--footnote", help="added after the toolkit's own footnote")
    parser.add_argument("--output", help="default OUTPUT_DIR/robustbench.json")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return cli.run(_compare_parser(), argv[1:])
    if argv and argv[0] == "robustbench":
        return cli.run(_robustbench_parser(), argv[1:])
    command = f"{PROG} " + " ".join(argv)
    if argv and argv[0] == "ablation":  # the shaping study, under its documented name
        from madry_ns.studies import shaping

        return shaping.main(argv[1:], prog=f"{PROG} ablation")
    return cli.run(_suite_parser(command), argv)
