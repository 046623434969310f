"""The suite's command line, in the one convention of `madry_ns.cli`:

    python -m madry_ns.evaluate --config CONFIG [--checkpoint PATH] [--attacks ...] [--modes ...]
    python -m madry_ns.evaluate ablation --config CONFIG --checkpoints A B ... --labels ...
    python -m madry_ns.evaluate compare OUTPUT_DIR_A OUTPUT_DIR_B [--names A B]

The bare command is the suite, so the command is chosen from the first argument (argparse has
no default subcommand); each has its own `--help`.
"""

from __future__ import annotations

import json
import os
import sys

from madry_ns import cli
from madry_ns.errors import ConfigError
from madry_ns.evaluate import reports, suite
from madry_ns.evaluate.ablation import ABLATION_RATIOS, run_ablation
from madry_ns.evaluate.rows import AUTOATTACK_NAMES, AUTOATTACK_VERSIONS, ROW

PROG = "python -m madry_ns.evaluate"


def _common(parser: cli.Parser) -> None:
    """The flags the suite and the ablation share (each stands for a config key)."""
    parser.add_override("--num_examples", "num_eval_examples", type=int,
                        help="first N test images (default: num_eval_examples)")
    parser.add_override("--batch_size", "eval_batch_size", type=int,
                        help="default: eval_batch_size")
    parser.add_override("--seed", "np_random_seed", type=int,
                        help="attack seed (default: np_random_seed)")
    parser.add_argument("--output", help="output folder (default model_dir/eval/suite-STEP, "
                                         "or model_dir/eval/ablation)")


def _settings(args) -> suite.Settings:
    return suite.Settings(attacks=args.attacks, modes=args.modes,
                          **{k: getattr(args, k) for k in suite.INT_SETTINGS},
                          **{k: getattr(args, k) for k in suite.FLOAT_SETTINGS},
                          autoattack=args.autoattack,
                          autoattack_attacks=args.autoattack_attacks,
                          sanity=not args.no_sanity)


def _suite_parser(command: str) -> cli.Parser:
    def check(config, args):
        suite.check_modes(config, _settings(args).modes)

    def main(config, args):
        suite.run(config, _settings(args), args.checkpoint, args.output, command,
                  resume=args.resume)

    parser = cli.Parser(PROG, "Every attack under BN, PN and BN+Shaping inference, with "
                              "sanity checks.", main, check=check)
    _common(parser)
    defaults = suite.Settings()
    parser.add_argument("--checkpoint", help="default: the latest in model_dir")
    parser.add_argument("--attacks", type=cli.comma_list, default=defaults.attacks,
                        help=f"comma-separated, among {','.join(ROW)} (default: all)")
    parser.add_argument("--modes", type=cli.comma_list, default=defaults.modes,
                        help="inference columns among bn,pn,shaped (default: all)")
    for name in suite.INT_SETTINGS:
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
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


def _ratios(args) -> list:
    ratios = []
    for r in args.ratios:
        if not r.isdigit():
            raise ConfigError(f"--ratios {r}: expected non-negative integers r of 1:r")
        ratios.append(int(r))
    return ratios


def _ablation_parser(command: str) -> cli.Parser:
    def main(config, args):
        run_ablation(config, args.checkpoints, args.labels, _ratios(args),
                     args.output or os.path.join(config.model_dir, "eval", "ablation"),
                     command)

    parser = cli.Parser(f"{PROG} ablation", "Table IV: checkpoints x inference ratios.", main,
                        check=lambda config, args: _ratios(args))
    _common(parser)
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="one checkpoint (or model_dir) per training ratio")
    parser.add_argument("--labels", nargs="+", required=True,
                        help="one row name per checkpoint, e.g. 1:1 1:2 1:3 1:7")
    parser.add_argument("--ratios", type=cli.comma_list,
                        default=tuple(map(str, ABLATION_RATIOS)),
                        help="inference ratios r of 1:r (default 0,1,3,9,19,49)")
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return cli.run(_compare_parser(), argv[1:])
    command = f"{PROG} " + " ".join(argv)
    if argv and argv[0] == "ablation":
        return cli.run(_ablation_parser(command), argv[1:])
    return cli.run(_suite_parser(command), argv)
