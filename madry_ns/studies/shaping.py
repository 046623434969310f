"""The shaping study: the norm-shaping paper's Table IV, checkpoints (one per training ratio)
under shaped inference at each inference ratio 1:r, with PGD generated on PN (the paper's
protocol) beside the exact adaptive PGD through the shaped forward.

    python -m madry_ns.studies.shaping --config CONFIG --checkpoints A B ... --labels 1:1 ...

(the same command as `python -m madry_ns.evaluate ablation`). Tables I and II, one model's
attacks under every inference mode, are the evaluation suite's (`madry_ns.evaluate`); this
study is the grid over training and inference ratios. It writes `ablation.json`,
`ablation.md` and `ablation.png` to --output, and `ablation.json` again after each cell
(checkpoint, inference ratio): run again with the same settings, it keeps the cells already
measured and runs only the rest. `--attack_examples N` attacks only the first N test images
while clean accuracy stays on all num_eval_examples.
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
_SAME = ("num_examples", "attack_examples", "dataset", "eval_batch_size", "epsilon",
         "num_steps", "step_size")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The inference ratios r of 1:r the grid's columns run, and how many of the test images
    the two attacks run on (`attack_examples`; None: all num_eval_examples). Clean accuracy
    is always measured on all num_eval_examples: the attacks cost 1 + r forwards per image
    per step, so on 10,000 images the 1:49 column alone would take hours on a CPU."""

    ratios: tuple = ABLATION_RATIOS
    attack_examples: int | None = None

    def __post_init__(self):
        for r in self.ratios:
            if int(r) != r or r < 0:
                raise ConfigError(f"--ratios {r}: expected non-negative integers r of 1:r")
        if not self.ratios:
            raise ConfigError("--ratios: expected at least one inference ratio")
        if self.attack_examples is not None and not (
                int(self.attack_examples) == self.attack_examples and self.attack_examples > 0):
            raise ConfigError(f"--attack_examples {self.attack_examples}: expected a positive "
                              f"integer")

    def check(self, config) -> None:
        """Raise ConfigError when eval_batch_size does not split into chunks of 1 + r, or
        attack_examples is not a whole number of eval batches within num_eval_examples."""
        for r in self.ratios:
            if config.eval_batch_size % (r + 1):
                raise ConfigError(f"--ratios {r}: eval_batch_size {config.eval_batch_size} "
                                  f"must split into chunks of 1 + {r}")
        n = self.attack_examples
        if n is not None and (n > config.num_eval_examples or n % config.eval_batch_size):
            raise ConfigError(f"--attack_examples {n}: expected a multiple of eval_batch_size "
                              f"{config.eval_batch_size} and at most num_eval_examples "
                              f"{config.num_eval_examples}")

    def attacked(self, config) -> int:
        """How many test images the attacks run on."""
        return config.num_eval_examples if self.attack_examples is None else self.attack_examples


def ablation(config, paths: list, labels: list, ratios=ABLATION_RATIOS, out=print,
             previous: dict | None = None, on_checkpoint=None,
             attack_examples: int | None = None) -> dict:
    """Each checkpoint under BN+Shaping at each inference ratio: clean accuracy, PGD generated
    on PN (the paper's Table IV) and the exact adaptive PGD through the shaped forward.

    Clean accuracy is on the first num_eval_examples test images, the two attacks on the
    first `attack_examples` of them (default: the same images). `previous` is an earlier
    result (an `ablation.json`): every cell (checkpoint, ratio) it measured with the same
    path and settings is taken from it, not run again. `on_checkpoint(result)` is called with
    the result so far after each cell (the command writes it to disk there), so a stopped
    grid loses at most the cell it was in.
    """
    from madry_ns import data

    if len(paths) != len(labels):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints; "
                          f"give one per checkpoint")
    settings = Settings(tuple(ratios), attack_examples)
    settings.check(config)
    dataset = data.load_dataset(config)
    result = {"checkpoints": dict(zip(labels, paths)), "ratios": list(ratios),
              "num_examples": config.num_eval_examples, "dataset": dataset.source,
              "eval_batch_size": config.eval_batch_size, "epsilon": config.epsilon,
              "num_steps": config.num_steps, "step_size": config.step_size,
              "grid": {"clean": {}, "transfer": {}, "adaptive": {}}}
    if settings.attacked(config) != config.num_eval_examples:
        result["attack_examples"] = settings.attacked(config)
    grid = result["grid"]
    done = _done_cells(previous, result)
    num_attacked = settings.attacked(config) // config.eval_batch_size
    for label, path in zip(labels, paths):
        for g in grid.values():
            g[label] = {}
        kept = [r for r in ratios if r in done.get(label, ())]
        for r in kept:
            for kind in grid:
                grid[kind][label][str(r)] = previous["grid"][kind][label][str(r)]
        if kept:
            out(f"{label}: 1:{', 1:'.join(map(str, kept))} kept from the previous run ({path})")
        if len(kept) == len(ratios):
            continue
        _, model = load_checkpoint(config, path)
        pn_examples = None  # generated on PN: the same for every inference ratio
        for r in ratios:
            if r in kept:
                continue
            start = time.perf_counter()
            c = config.replace(inference_bn="shaped", inference_ratio=r,
                               inference_mixing="per_batch")
            suite_settings = SuiteSettings(attacks=("pgd", "adaptive"), modes=("shaped",),
                                           sanity=False)
            suite = Suite(model, c, dataset, suite_settings)
            test_batches = batches(dataset, c)
            attacked = test_batches[:num_attacked]
            y = np.concatenate([b[1] for b in test_batches])
            y_attacked = np.concatenate([b[1] for b in attacked])
            tf = suite.tf
            if pn_examples is None:
                generate = suite.generator("pgd", None)
                pn_examples = [generate(tf.constant(x), tf.constant(yb, tf.int64),
                                        tf.constant(i, tf.int64)).numpy()
                               for i, (x, yb) in enumerate(attacked)]
            clean = [suite.classify("shaped", x, i) for i, (x, _) in enumerate(test_batches)]
            transfer = [suite.classify("shaped", adv, i) for i, adv in enumerate(pn_examples)]
            grid["clean"][label][str(r)] = float((np.concatenate(clean) == y).mean())
            grid["transfer"][label][str(r)] = float(
                (np.concatenate(transfer) == y_attacked).mean())
            grid["adaptive"][label][str(r)] = float(pgd_accuracy(suite, attacked,
                                                                  "shaped").mean())
            pct = {kind: reports.pct(grid[kind][label][str(r)]) for kind in grid}
            out(f"{label} 1:{r}: clean {pct['clean']}  PN-generated PGD {pct['transfer']}  "
                f"adaptive PGD {pct['adaptive']}  ({time.perf_counter() - start:.1f} s)")
            if on_checkpoint is not None:
                on_checkpoint(result)
    return result


def _done_cells(previous: dict | None, result: dict) -> dict:
    """Label -> the inference ratios whose three cells `previous` holds for the same
    checkpoint and settings (an ablation.json written before `attack_examples` existed
    attacked all its images)."""
    if not previous:
        return {}
    stored = {**previous, "attack_examples": previous.get("attack_examples")}
    fresh = {**result, "attack_examples": result.get("attack_examples")}
    if any(stored.get(k) != fresh[k] for k in _SAME):
        return {}
    grid = previous.get("grid", {})
    done = {}
    for label, path in result["checkpoints"].items():
        if previous.get("checkpoints", {}).get(label) != path:
            continue
        ratios = {r for r in result["ratios"]
                  if all(str(r) in grid.get(kind, {}).get(label, {}) for kind in result["grid"])}
        if ratios:
            done[label] = ratios
    return done


def _reusable(previous: dict | None, result: dict) -> set:
    """The labels whose every grid cell `previous` holds for the same checkpoint and
    settings."""
    done = _done_cells(previous, result)
    return {label for label, ratios in done.items() if len(ratios) == len(result["ratios"])}


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
                      on_checkpoint=save, attack_examples=settings.attack_examples)
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
        return Settings(tuple(int(r) for r in args.ratios), args.attack_examples)

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
    parser.add_argument("--attack_examples", type=int, default=None,
                        help="attack only the first N test images (a multiple of "
                             "eval_batch_size; default: all num_eval_examples); clean "
                             "accuracy is always on all of them")
    return cli.run(parser, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
