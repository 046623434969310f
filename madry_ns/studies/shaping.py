"""The shaping study: the norm-shaping paper's Table IV, checkpoints (one per training ratio)
under shaped inference at each inference ratio 1:r, with PGD generated on PN (the paper's
protocol) beside the exact adaptive PGD through the shaped forward.

    python -m madry_ns.studies.shaping --config CONFIG --checkpoints A B ... --labels 1:1 ...

(the same command as `python -m madry_ns.evaluate ablation`). Tables I and II, one model's
attacks under every inference mode, are the evaluation suite's (`madry_ns.evaluate`); this
study is the grid over training and inference ratios. It writes `ablation.json`,
`ablation.md` and `ablation.png` to --output, and `ablation.json` again after each checkpoint:
run again with the same settings, it keeps the checkpoints already measured and runs only the
rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from madry_ns.errors import ConfigError
from madry_ns.evaluate import reports
from madry_ns.evaluate.suite import Settings as SuiteSettings
from madry_ns.evaluate.suite import Suite, batches, load_checkpoint, pgd_accuracy

PAPER = ("Zhang & Ma, 'Achieving Both Model Accuracy and Robustness by Adversarial Training "
         "with Batch Norm Shaping', ICTAI 2022: Table IV")
ABLATION_RATIOS = (0, 1, 3, 9, 19, 49)
# What two runs must share for one's grid entries to stand in the other's table.
_SAME = ("ratios", "num_examples", "dataset", "eval_batch_size", "epsilon", "num_steps",
         "step_size")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The inference ratios r of 1:r the grid's columns run."""

    ratios: tuple = ABLATION_RATIOS

    def __post_init__(self):
        for r in self.ratios:
            if int(r) != r or r < 0:
                raise ConfigError(f"--ratios {r}: expected non-negative integers r of 1:r")
        if not self.ratios:
            raise ConfigError("--ratios: expected at least one inference ratio")

    def check(self, config) -> None:
        """Raise ConfigError when eval_batch_size does not split into chunks of 1 + r."""
        for r in self.ratios:
            if config.eval_batch_size % (r + 1):
                raise ConfigError(f"--ratios {r}: eval_batch_size {config.eval_batch_size} "
                                  f"must split into chunks of 1 + {r}")


def ablation(config, paths: list, labels: list, ratios=ABLATION_RATIOS, out=print,
             previous: dict | None = None, on_checkpoint=None) -> dict:
    """Each checkpoint under BN+Shaping at each inference ratio: clean accuracy, PGD generated
    on PN (the paper's Table IV) and the exact adaptive PGD through the shaped forward.

    `previous` is an earlier result (an `ablation.json`): a checkpoint it measured with the
    same path and settings is taken from it, not run again. `on_checkpoint(result)` is called
    with the result so far after each checkpoint (the command writes it to disk there).
    """
    from madry_ns import data

    if len(paths) != len(labels):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints; "
                          f"give one per checkpoint")
    settings = Settings(tuple(ratios))
    settings.check(config)
    dataset = data.load_dataset(config)
    result = {"checkpoints": dict(zip(labels, paths)), "ratios": list(ratios),
              "num_examples": config.num_eval_examples, "dataset": dataset.source,
              "eval_batch_size": config.eval_batch_size, "epsilon": config.epsilon,
              "num_steps": config.num_steps, "step_size": config.step_size,
              "grid": {"clean": {}, "transfer": {}, "adaptive": {}}}
    grid = result["grid"]
    reusable = _reusable(previous, result)
    for label, path in zip(labels, paths):
        if label in reusable:
            for kind in grid:
                grid[kind][label] = previous["grid"][kind][label]
            out(f"{label}: kept from the previous run ({path})")
            continue
        _, model = load_checkpoint(config, path)
        for g in grid.values():
            g[label] = {}
        pn_examples = None  # generated on PN: the same for every inference ratio
        for r in ratios:
            start = time.perf_counter()
            c = config.replace(inference_bn="shaped", inference_ratio=r,
                               inference_mixing="per_batch")
            suite_settings = SuiteSettings(attacks=("pgd", "adaptive"), modes=("shaped",),
                                           sanity=False)
            suite = Suite(model, c, dataset, suite_settings)
            test_batches = batches(dataset, c)
            y = np.concatenate([b[1] for b in test_batches])
            tf = suite.tf
            if pn_examples is None:
                generate = suite.generator("pgd", None)
                pn_examples = [generate(tf.constant(x), tf.constant(yb, tf.int64),
                                        tf.constant(i, tf.int64)).numpy()
                               for i, (x, yb) in enumerate(test_batches)]
            clean, transfer = [], []
            for i, ((x, _), adv) in enumerate(zip(test_batches, pn_examples)):
                clean.append(suite.classify("shaped", x, i))
                transfer.append(suite.classify("shaped", adv, i))
            grid["clean"][label][str(r)] = float((np.concatenate(clean) == y).mean())
            grid["transfer"][label][str(r)] = float((np.concatenate(transfer) == y).mean())
            grid["adaptive"][label][str(r)] = float(pgd_accuracy(suite, test_batches,
                                                                  "shaped").mean())
            pct = {kind: reports.pct(grid[kind][label][str(r)]) for kind in grid}
            out(f"{label} 1:{r}: clean {pct['clean']}  PN-generated PGD {pct['transfer']}  "
                f"adaptive PGD {pct['adaptive']}  ({time.perf_counter() - start:.1f} s)")
        if on_checkpoint is not None:
            on_checkpoint(result)
    return result


def _reusable(previous: dict | None, result: dict) -> set:
    """The labels whose grid entries `previous` holds for the same checkpoint and settings."""
    if not previous or any(previous.get(k) != result[k] for k in _SAME):
        return set()
    done = set(previous.get("grid", {}).get("adaptive", {}))
    return {label for label, path in result["checkpoints"].items()
            if label in done and previous["checkpoints"].get(label) == path
            and all(str(r) in previous["grid"][kind][label] for r in result["ratios"]
                    for kind in result["grid"])}


def run(config, paths: list, labels: list, output: str, settings: Settings = Settings(),
        command: str = "", out=print) -> dict:
    """The study: the grid (resumed from `output`/ablation.json when one is there), then
    ablation.json, ablation.md and the heat map ablation.png in `output`."""
    from madry_ns import files

    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "ablation.json")
    previous = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)

    def save(result):
        files.atomic_write_text(path, json.dumps({**result, "command": command}, indent=2)
                                + "\n")

    result = ablation(config, paths, labels, settings.ratios, out=out, previous=previous,
                      on_checkpoint=save)
    save(result)
    text = table(result, command)
    files.atomic_write_text(os.path.join(output, "ablation.md"), text)
    reports.ablation_heatmap(result, os.path.join(output, "ablation.png"))
    out(text)
    out(f"wrote {output}/ablation.md, ablation.json, ablation.png")
    return result


def table(result: dict, command: str = "") -> str:
    """The grid as Markdown (`madry_ns.evaluate.reports.ablation_markdown`)."""
    return reports.ablation_markdown(result, command)


def run_ablation(config, paths, labels, ratios, output: str, command: str = "",
                 out=print) -> dict:
    """`run` under the name and arguments of earlier versions."""
    return run(config, paths, labels, output, Settings(tuple(ratios)), command, out)


def main(argv=None, prog: str = "python -m madry_ns.studies.shaping") -> int:
    """The command line (`python -m madry_ns.evaluate ablation` is this with its own prog)."""
    import sys

    from madry_ns import cli
    from madry_ns.evaluate.cli import common_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"{prog} " + " ".join(argv)

    def settings(args) -> Settings:
        bad = [r for r in args.ratios if not r.isdigit()]
        if bad:
            raise ConfigError(f"--ratios {bad[0]}: expected non-negative integers r of 1:r")
        return Settings(tuple(int(r) for r in args.ratios))

    def command_main(config, args):
        run(config, args.checkpoints, args.labels,
            args.output or os.path.join(config.model_dir, "eval", "ablation"),
            settings(args), command)

    parser = cli.Parser(prog, "Table IV: checkpoints x inference ratios.", command_main,
                        check=lambda config, args: settings(args).check(config))
    common_flags(parser)
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="one checkpoint (or model_dir) per training ratio")
    parser.add_argument("--labels", nargs="+", required=True,
                        help="one row name per checkpoint, e.g. 1:1 1:2 1:3 1:7")
    parser.add_argument("--ratios", type=cli.comma_list,
                        default=tuple(map(str, ABLATION_RATIOS)),
                        help="inference ratios r of 1:r (default 0,1,3,9,19,49)")
    return cli.run(parser, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
