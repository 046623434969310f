"""The fragile-features study (Walter, Stutz & Schiele, Table 2) as one command.

    python -m madry_ns.studies.fragile configs/fragile/cifar10 --output results/fragile_cifar10

(`python -m madry_ns.fragile` is the same command under its earlier name.)

A config folder holds one config per row of the paper's Table 2, named by the row's key
(`ROWS`). For each row, in table order, the command trains the config (`training.train`:
resumes a run that was interrupted, returns at once for one that is complete; the fine-tuned
rows start from `init_checkpoint`, the NORMAL row's model_dir, so NORMAL comes first),
evaluates the final checkpoint and caches the result in `<model_dir>/fragile_eval.json`
(reused while checkpoint and evaluation settings are unchanged; a stopped evaluation
continues after its last finished batch or chunk of survivors, kept in
`fragile_eval.partial.json`). Then it writes to --output:

* `table.md` and `table.json`: clean error on the whole test set, robust error under
  AutoAttack and under PGD on the first N test images, the PGD cross-entropy, beside the
  paper's numbers. `--autoattack standard` is AutoAttack's standard version (APGD-CE,
  APGD-T, FAB-T, Square) on survivors, as the paper ran it; the default `legacy` is the
  earlier ensemble (`madry_ns.attacks.autoattack_style`: APGD-CE, APGD-T, Square on the
  fixed batch, per-image worst case), which the digits record was made with;
* `bn_analysis/`: the folded-BN analysis (`madry_ns.studies.fragile_bn`) on NORMAL, ADV
  and BN PARAMS (those of them that ran), differences against NORMAL.

Every model here normalizes with its moving (population) statistics at test time, and every
attack differentiates through that same forward: white-box numbers. Each config's row is
checked against what the row means (training method, `trainable`, fine-tuned or from
scratch, reset), so a table row cannot silently come from the wrong regime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from madry_ns import config as config_lib
from madry_ns.errors import ConfigError
from madry_ns.studies import fragile_bn

PAPER = ("Walter, Stutz & Schiele, 'On Fragile Features and Batch Normalization in "
         "Adversarial Training': Table 2, Figures 1-2")

ADVERSARIAL = ("madry", "trades")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 2: what it is, how it must be configured, the paper's numbers."""

    key: str
    label: str
    paper_clean_error: float
    paper_robust_error: float
    adversarial: bool
    trainable: str
    fine_tuned: bool
    reset_bn_stats: bool = False


# Paper Table 2 (CIFAR-10, ResNet-20, errors in %, AutoAttack on the first 1000 test images,
# L-inf eps 8/255), in the paper's order.
ROWS = (
    Row("normal", "NORMAL", 4.11, 99.8, False, "all", False),
    Row("normal_bn_only", "NORMAL + BN ONLY", 46.11, 99.7, False, "bn", False),
    Row("normal_bn_only_logits_conv1", "NORMAL + BN ONLY + log + conv1", 35.89, 99.6, False,
        "bn+logits+conv1", False),
    Row("adv", "ADV", 17.67, 58.4, True, "all", False),
    Row("adv_bn_only", "ADV + BN ONLY", 43.33, 98.0, True, "bn", False),
    Row("adv_bn_only_logits_conv1", "ADV + BN ONLY + log + conv1", 35.22, 98.1, True,
        "bn+logits+conv1", False),
    Row("bn_stats", "BN STATS (no reset)", 6.44, 99.9, True, "bn_stats", True),
    Row("bn_stats_reset", "BN STATS (reset)", 6.33, 99.6, True, "bn_stats", True, True),
    Row("bn_only_params", "BN ONLY PARAMS", 77.11, 85.3, True, "bn_affine", True),
    # The paper's one row, read the other way: gamma/beta trained through batch statistics.
    Row("bn_only_params_batch", "BN ONLY PARAMS (batch statistics)", 77.11, 85.3, True,
        "bn_affine_batch", True),
    Row("bn_params", "BN PARAMS", 29.67, 70.5, True, "bn", True),
    Row("bn_params_logits_conv1", "BN PARAMS + log + conv1", 26.89, 68.2, True,
        "bn+logits+conv1", True),
)
ROW_BY_KEY = {row.key: row for row in ROWS}
ANALYSIS_ROWS = ("normal", "adv", "bn_params")  # the paper's Figures 1 and 2


# How the AutoAttack column is made: 'standard' is AutoAttack's standard version (APGD-CE,
# APGD-T, FAB-T, Square) under the official survivors protocol, exact here because every model
# of this study classifies with population statistics (a per-image forward); 'legacy' is the
# earlier fixed-batch ensemble without FAB-T (`attacks.autoattack_style`) that the digits
# record was made with, kept so that it repeats.
AUTOATTACK_VERSIONS = ("legacy", "standard")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each model is evaluated; defaults are the paper's (AutoAttack on the first 1000
    test images) plus PGD-20. `aa_steps` and `aa_targets` are APGD's and, under 'standard',
    FAB-T's too; `aa_restarts` is APGD-CE's."""

    num_robust_examples: int = 1000
    aa_steps: int = 100
    aa_restarts: int = 1
    aa_targets: int = 9
    aa_queries: int = 5000
    pgd_steps: int = 20
    pgd_step_size: float | None = None  # None: the config's step_size
    autoattack: str = "legacy"

    def __post_init__(self):
        if self.autoattack not in AUTOATTACK_VERSIONS:
            raise ConfigError(f"--autoattack {self.autoattack}: expected one of "
                              f"{', '.join(AUTOATTACK_VERSIONS)}")

    def attack_names(self) -> tuple:
        """The AutoAttack column's attacks, in the order they run."""
        from madry_ns import attacks

        return attacks.ATTACKS if self.autoattack == "legacy" else attacks.VERSIONS["standard"]


def check_row(row: Row, config, path: str) -> None:
    """Raise ConfigError if `config` does not describe `row`."""
    problems = []
    adversarial = config.training_method in ADVERSARIAL
    if adversarial != row.adversarial:
        problems.append(f"training_method is '{config.training_method}', the row needs "
                        + ("an adversarial one ('madry' or 'trades')" if row.adversarial
                           else "'natural'"))
    if config.trainable != row.trainable:
        problems.append(f"trainable is '{config.trainable}', the row needs '{row.trainable}'")
    if bool(config.init_checkpoint) != row.fine_tuned:
        problems.append("the row fine-tunes the NORMAL model: set init_checkpoint to its "
                        "model_dir" if row.fine_tuned else
                        "the row trains from scratch: init_checkpoint must be null")
    if config.reset_bn_stats != row.reset_bn_stats:
        problems.append(f"reset_bn_stats must be {str(row.reset_bn_stats).lower()}")
    if config.inference_bn != "population":
        problems.append("inference_bn must be 'population' (the paper's test-time BN)")
    if problems:
        raise ConfigError(f"{path}: does not describe Table 2's row '{row.label}':\n  - "
                          + "\n  - ".join(problems))


def load_rows(config_dir: str, keys: list[str] | None = None) -> list[tuple[Row, object, str]]:
    """(row, config, path) for each requested row (default: every row whose config file
    exists in `config_dir`), in table order."""
    if not os.path.isdir(config_dir):
        raise ConfigError(f"config folder '{config_dir}' not found; expected a folder with "
                          f"one config per Table 2 row ({', '.join(r.key for r in ROWS)}.json)")
    unknown = [k for k in keys or [] if k not in ROW_BY_KEY]
    if unknown:
        raise ConfigError(f"unknown rows {unknown}; the rows are "
                          f"{', '.join(r.key for r in ROWS)}")
    found = []
    for row in ROWS:
        path = os.path.join(config_dir, row.key + ".json")
        if keys is not None and row.key not in keys:
            continue
        if not os.path.exists(path):
            if keys is not None:
                raise ConfigError(f"row '{row.key}' requested but '{path}' does not exist")
            continue
        config = config_lib.load(path)
        check_row(row, config, path)
        found.append((row, config, path))
    if not found:
        raise ConfigError(f"no Table 2 configs in '{config_dir}' (expected files such as "
                          f"normal.json, bn_params.json)")
    return found


def describe_evaluation(config, settings: Settings) -> dict:
    """Labels saying how the numbers are made."""
    step = settings.pgd_step_size or config.step_size
    if settings.autoattack == "legacy":
        autoattack = (f"AutoAttack-style ensemble (madry_ns.autoattack): APGD-CE "
                      f"{settings.aa_steps} steps x {settings.aa_restarts} restart(s), "
                      f"APGD-T {settings.aa_steps} steps x {settings.aa_targets} targets, "
                      f"Square {settings.aa_queries} queries; no FAB-T; eps "
                      f"{config.epsilon:g}/255")
    else:
        autoattack = (f"AutoAttack standard (madry_ns.attacks.auto_attack): APGD-CE "
                      f"{settings.aa_steps} steps x {settings.aa_restarts} restart(s), "
                      f"APGD-T and FAB-T {settings.aa_steps} steps x {settings.aa_targets} "
                      f"targets, Square {settings.aa_queries} queries, each on the images "
                      f"the earlier ones left robust (the official survivors protocol); eps "
                      f"{config.epsilon:g}/255")
    return {
        "inference": "population statistics (PN), the same forward for every attack "
                     "(white-box)",
        "autoattack": autoattack,
        "autoattack_version": settings.autoattack,
        "pgd": f"PGD-{settings.pgd_steps} (xent, eps {config.epsilon:g}/255, step {step:g}, "
               f"random start)",
    }


def _params(settings: Settings):
    """The `attacks.AutoAttackParams` of the 'standard' column."""
    from madry_ns import attacks

    return attacks.AutoAttackParams(
        apgd_steps=settings.aa_steps, apgd_restarts=settings.aa_restarts,
        apgd_targets=settings.aa_targets, fab_steps=settings.aa_steps,
        fab_targets=settings.aa_targets, square_queries=settings.aa_queries)


def evaluate_model(model, dataset, config, settings: Settings, out=None,
                   progress_path: str | None = None, progress_key: dict | None = None) -> dict:
    """Clean error on the whole test set; on the first `num_robust_examples` test images the
    robust error under AutoAttack (`settings.autoattack`), under PGD, and under both (an
    image counts as robust only if it survives every attack). Population statistics
    throughout.

    PGD (and the legacy ensemble) run batch by batch, each batch seeded by its index;
    'standard' then runs AutoAttack's attacks one after the other on the images still
    robust, re-batched over all of them (`attacks.auto_attack_survivors`). With
    `progress_path`, the outcomes so far are written there after each batch or chunk (with
    `progress_key`), and a run that finds a file with the same key there continues from it:
    a stopped evaluation resumes to the uninterrupted result. `out` gets a progress line
    per batch or chunk.
    """
    import tensorflow as tf

    from madry_ns import attacks, data, evaluation, files, inference, seeds

    n = settings.num_robust_examples
    if n > len(dataset.test_images):
        raise ConfigError(f"--num_robust_examples {n} exceeds the {len(dataset.test_images)} "
                          f"test images of {dataset.source}")
    say = out or (lambda line: None)
    classify = evaluation.make_classifier(model, config, dataset)
    predicted = evaluation.predict(classify, dataset.test_images, config.eval_batch_size)
    clean_error = float(np.mean(predicted != dataset.test_labels))

    pgd_config = config.replace(num_steps=settings.pgd_steps,
                                step_size=settings.pgd_step_size or config.step_size,
                                random_start=True, loss_func="xent")
    pgd = evaluation.make_eval_attack(model, pgd_config, classify)

    population = inference.forward(model, config, dataset, "population")

    def logits_fn(x):
        return population(x, seeds.reference_draw(config, 0))

    legacy = settings.autoattack == "legacy"
    ensemble = attacks.compile_attack(
        attacks.autoattack_style, logits_fn, epsilon=config.epsilon,
        num_steps=settings.aa_steps, num_restarts=settings.aa_restarts,
        num_targets=settings.aa_targets, square_num_steps=settings.aa_queries) if legacy \
        else None
    state = {"key": progress_key, "batches": 0, "pgd": [], "ensemble": {},
             "xent": {"clean": 0.0, "pgd": 0.0}, "autoattack": None}
    resumed = None
    if progress_path and os.path.exists(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            stored = json.load(f)
        if _same_key(stored.get("key"), progress_key) and set(stored) == set(state):
            state = stored
            resumed = {"batches": state["batches"]}
            if state["autoattack"]:
                resumed["autoattack"] = {k: state["autoattack"][k] for k in ("attack", "chunk")}
            say(f"resuming the evaluation ({progress_path}): {resumed}")

    def save():
        if progress_path:
            files.atomic_write_text(progress_path, json.dumps(state) + "\n")

    start = time.perf_counter()
    x_all, y_all = dataset.test_images[:n], dataset.test_labels[:n]
    batches = data.eval_batches(dataset.test_images, dataset.test_labels, n,
                                config.eval_batch_size)
    for i, (x, y) in enumerate(batches):
        if i < state["batches"]:
            continue
        if legacy:
            seed = tf.constant([config.np_random_seed, i], tf.int64)
            for k, v in ensemble(tf.constant(x), tf.constant(y), seed).items():
                if k != "x_adv":
                    state["ensemble"].setdefault(k, []).extend(v.numpy().tolist())
        clean_logits, pgd_logits = classify(x), classify(pgd(x, y, i))
        state["pgd"].extend((np.argmax(pgd_logits.numpy(), 1) == y).tolist())
        state["xent"]["clean"] += float(tf.reduce_sum(attacks.xent_loss(clean_logits, y)))
        state["xent"]["pgd"] += float(tf.reduce_sum(attacks.xent_loss(pgd_logits, y)))
        state["batches"] = i + 1
        save()
        say(f"  PGD{' and the ensemble' if legacy else ''}: {len(state['pgd'])}/{n} images "
            f"({time.perf_counter() - start:.0f} s this run)")
    if legacy:
        outcome = {k: np.array(v, bool) for k, v in state["ensemble"].items()}
    else:
        params = _params(settings)

        def on_chunk(aa_state):
            state["autoattack"] = aa_state
            save()
            step = min(aa_state["attack"], len(params.attacks) - 1)
            robust = np.array(aa_state["clean"], bool)
            for v in aa_state["correct"].values():
                robust &= np.array(v, bool)
            left = len(aa_state["survivors"])
            done = min(aa_state["chunk"] * config.eval_batch_size, left)
            say(f"  AutoAttack {params.attacks[step]}: {done}/{left} survivors done, "
                f"{int(robust.sum())}/{n} robust ({time.perf_counter() - start:.0f} s this run)")

        outcome = attacks.auto_attack_survivors(
            logits_fn, x_all, y_all, epsilon=float(config.epsilon),
            batch_size=config.eval_batch_size, params=params,
            seed=(config.np_random_seed, 0), state=state["autoattack"], on_chunk=on_chunk)
    pgd_ok = np.logical_and(outcome["clean"], np.array(state["pgd"], bool))
    both = np.logical_and(outcome["robust"], pgd_ok)

    def error(correct):
        return 100.0 * (1.0 - int(np.sum(correct)) / n)

    # Under the survivors protocol an attack runs only on the images the earlier ones left
    # robust, so its count is the images it broke on top of them, not its error alone.
    per_attack = "error_per_attack" if legacy else "newly_broken_per_attack"
    xent = state["xent"]
    return {
        "clean_error": 100.0 * clean_error, "num_test_examples": len(dataset.test_images),
        "robust_error_autoattack": error(outcome["robust"]), "robust_error_pgd": error(pgd_ok),
        "robust_error_worst": error(both), "clean_error_first_n": error(outcome["clean"]),
        per_attack: {name: error(outcome[name]) for name in settings.attack_names()},
        "pgd_xent_adv": xent["pgd"] / n, "pgd_xent_clean": xent["clean"] / n,
        "num_robust_examples": n, **describe_evaluation(config, settings),
        **({"resumed_from": resumed} if resumed else {}),
    }


def _same_key(stored, key) -> bool:
    """Whether a cached evaluation (or its progress) was made for `key`: the same settings
    and the same checkpoint file name. The cache lives beside the checkpoint in model_dir,
    so the file name identifies it there; comparing whole paths would throw away hours of
    evaluation whenever the checkout (or a kept model folder) is somewhere else."""
    def located(k):
        if isinstance(k, dict) and isinstance(k.get("checkpoint"), str):
            return {**k, "checkpoint": os.path.basename(k["checkpoint"])}
        return k
    return located(stored) == located(key)


def run_row(row: Row, config, settings: Settings, out=print) -> dict:
    """Train (or resume, or find complete) and evaluate one row; cached evaluation."""
    from madry_ns import checkpoints, data, files, finetune, training
    from madry_ns.models import build_model

    out(f"=== {row.label} ({row.key}): trainable {config.trainable}, training_method "
        f"{config.training_method}"
        + (f", from {config.init_checkpoint}" if config.init_checkpoint else ", from scratch")
        + (", statistics reset" if config.reset_bn_stats else "") + f" -> {config.model_dir}")
    start = time.perf_counter()
    checkpoint = training.train(config, out=out)
    train_seconds = time.perf_counter() - start
    cache_path = os.path.join(config.model_dir, "fragile_eval.json")
    key = {"checkpoint": os.path.abspath(checkpoint), "settings": dataclasses.asdict(settings)}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cached = json.load(f)
        if _same_key({k: cached.get(k) for k in key}, key):
            out(f"evaluation cached in {cache_path}")
            return cached
    dataset = data.load_dataset(config)
    model = build_model(config)
    checkpoints.load_weights(model, checkpoint)
    start = time.perf_counter()
    progress_path = os.path.join(config.model_dir, "fragile_eval.partial.json")
    result = evaluate_model(model, dataset, config, settings, out=out,
                            progress_path=progress_path, progress_key=key)
    counts = finetune.parameter_counts(model, config)
    record = {**key, "row": row.key, "label": row.label, "dataset": dataset.source,
              "model": config.model, "model_width": config.model_width,
              "trainable": config.trainable, "training_method": config.training_method,
              "init_checkpoint": config.init_checkpoint, "reset_bn_stats": config.reset_bn_stats,
              "steps": checkpoints.checkpoint_step(checkpoint),
              "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
              "train_seconds_this_call": round(train_seconds, 1),
              # A resumed evaluation's seconds are this call's only (resumed_from).
              "eval_seconds": round(time.perf_counter() - start, 1), **result}
    files.atomic_write_text(cache_path, json.dumps(record, indent=2) + "\n")
    os.remove(progress_path)
    out(f"clean error {result['clean_error']:.2f}%, robust error ({_autoattack_name(record)}) "
        f"{result['robust_error_autoattack']:.2f}%, (PGD) {result['robust_error_pgd']:.2f}%")
    return record


def table(records: list[dict]) -> str:
    """Table 2's layout, ours beside the paper's."""
    first = records[0]
    n = first["num_robust_examples"]
    name = _autoattack_name(first)
    lines = [
        "| Model | `trainable` | start | trainable params | clean error % | robust error % "
        f"({name}) | robust error % (PGD) | robust error % (both) | PGD adv. xent | "
        "paper clean error % | paper robust error % (AutoAttack) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        row = ROW_BY_KEY[r["row"]]
        start = "NORMAL" + (", stats reset" if r["reset_bn_stats"] else "") \
            if r["init_checkpoint"] else "scratch"
        share = 100.0 * r["trainable_parameters"] / r["total_parameters"]
        lines.append(
            f"| {row.label} | {r['trainable']} | {start} | {share:.3g}% | "
            f"{r['clean_error']:.2f} | {r['robust_error_autoattack']:.2f} | "
            f"{r['robust_error_pgd']:.2f} | {r['robust_error_worst']:.2f} | "
            f"{r['pgd_xent_adv']:.3f} | "
            f"{row.paper_clean_error:.2f} | {row.paper_robust_error:.1f} |")
    datasets = sorted({r["dataset"] for r in records})
    lines += [
        "",
        f"Ours: {', '.join(datasets)}; {first['model']} width "
        f"{first['model_width'] or 1}. Clean error on all {first['num_test_examples']} test "
        f"images; robust errors on the first {n}. Inference: {first['inference']}.",
        f"{name}: {first['autoattack']}. PGD: {first['pgd']}. \"both\": an image "
        f"counts as robust only if it survives both.",
        "Paper: CIFAR-10, ResNet-20, AutoAttack (standard) on the first 1000 test images, "
        "L-inf eps 8/255.",
    ]
    if any("cifar" not in d.lower() for d in datasets):
        lines.append("**These numbers are not comparable to the paper's**: other data, "
                     "budget and epsilon; only the ordering of the rows can be compared.")
    return "\n".join(lines) + "\n"


def _autoattack_name(record: dict) -> str:
    """The AutoAttack column's name for a record (records before 'standard' were legacy)."""
    return ("AutoAttack-style" if record.get("autoattack_version", "legacy") == "legacy"
            else "AutoAttack")


def run(config_dir: str, output_dir: str, settings: Settings,
        keys: list[str] | None = None, analysis: bool = True, out=print) -> list[dict]:
    """The whole experiment: train and evaluate every row, write the table and analysis."""
    from madry_ns import files

    rows = load_rows(config_dir, keys)
    records = [run_row(row, config, settings, out) for row, config, _ in rows]
    os.makedirs(output_dir, exist_ok=True)
    files.atomic_write_text(os.path.join(output_dir, "table.json"), json.dumps(
        {"rows": records, "paper": [dataclasses.asdict(r) for r in ROWS]}, indent=2) + "\n")
    text = table(records)
    files.atomic_write_text(os.path.join(output_dir, "table.md"), text)
    out(text)
    chosen = [(row, config) for row, config, _ in rows if row.key in ANALYSIS_ROWS]
    if analysis and len(chosen) >= 2:
        fragile_bn.run_bn([config.model_dir for _, config in chosen],
                            [row.label for row, _ in chosen],
                            os.path.join(output_dir, "bn_analysis"), out=out)
    return records


def main(argv=None, prog: str = "python -m madry_ns.studies.fragile") -> int:
    """The command line (`python -m madry_ns.fragile` is this with its own prog)."""
    from madry_ns import cli

    parser = cli.Parser(
        prog, "Train and evaluate the fragile-features Table 2 rows "
        "of a config folder.", _main, config=False, tensorflow=True,
        check=lambda args: load_rows(args.config_dir, args.rows))  # before TensorFlow loads
    parser.add_argument("config_dir", help="folder with one config per row "
                        "(configs/fragile/cifar10 or configs/fragile/digits)")
    parser.add_argument("--output", required=True, help="folder for table.md, table.json "
                        "and bn_analysis/")
    parser.add_argument("--rows", nargs="+", help="only these rows (default: every config "
                        "in the folder), e.g. normal bn_params")
    defaults = Settings()
    parser.add_argument("--num_robust_examples", type=int,
                        default=defaults.num_robust_examples,
                        help="first N test images for the robust errors (paper: 1000)")
    parser.add_argument("--aa_steps", type=int, default=defaults.aa_steps,
                        help="APGD iterations (AutoAttack: 100)")
    parser.add_argument("--aa_restarts", type=int, default=defaults.aa_restarts)
    parser.add_argument("--aa_targets", type=int, default=defaults.aa_targets,
                        help="APGD-T target classes (AutoAttack: 9)")
    parser.add_argument("--aa_queries", type=int, default=defaults.aa_queries,
                        help="Square queries (AutoAttack: 5000)")
    parser.add_argument("--autoattack", choices=AUTOATTACK_VERSIONS, default=defaults.autoattack,
                        help="standard: AutoAttack's standard version on survivors (the "
                        "paper's); legacy: the earlier fixed-batch ensemble without FAB-T, "
                        "which the digits record used (default, so that it repeats)")
    parser.add_argument("--pgd_steps", type=int, default=defaults.pgd_steps)
    parser.add_argument("--pgd_step_size", type=float, default=None,
                        help="0-255 scale (default: the config's step_size)")
    parser.add_argument("--no_analysis", action="store_true",
                        help="skip the BN analysis of NORMAL, ADV, BN PARAMS")
    return cli.run(parser, argv)


def _main(args) -> None:
    settings = Settings(args.num_robust_examples, args.aa_steps, args.aa_restarts,
                            args.aa_targets, args.aa_queries, args.pgd_steps,
                            args.pgd_step_size, args.autoattack)
    run(args.config_dir, args.output, settings, args.rows, not args.no_analysis)



# Names of earlier versions.
EvalSettings = Settings
table_markdown = table


if __name__ == "__main__":
    sys.exit(main())
