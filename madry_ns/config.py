"""Configuration: Madry's `config.json`, key for key, plus the keys madry_ns adds.

Madry's scripts read `./config.json` with `json.load`; so do ours, but into a frozen
`Config` that rejects unknown keys (naming the closest known one), wrong types and
out-of-range values. Keys starting with `_` are comments and may repeat, as Madry's
`_comment` does. All scales are Madry's: pixels in [0, 255], epsilon and step size too.

This module imports no TensorFlow, so a bad config fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Callable, Sequence

from madry_ns import data
from madry_ns.errors import ConfigError

MODELS = ("madry_wrn", "resnet20", "resnet18", "wrn34")
TRAINING_METHODS = ("madry", "trades", "natural")
LOSS_FUNCS = ("xent", "cw")
BN_MODES = ("population", "batch_update", "batch_frozen")
TRAINABLE = ("all", "bn_stats", "bn_affine", "bn_affine_batch", "bn", "bn+logits+conv1")
# The regimes that train gamma/beta with the moving statistics frozen.
FROZEN_STATISTICS = ("bn_affine", "bn_affine_batch")
# Best-checkpoint selection (`madry_ns.selection`).
SELECT_BEST = ("none", "heldout", "test")
# The models' input normalizations (`madry_ns.models`, which explains them) and CIFAR-10's
# channel constants on the 0-1 scale, as RNA's utils.py and RobustBench use them.
INPUT_NORMALIZATIONS = ("per_image", "channel", "none")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _key(default: Any, doc: str, check: Callable[[Any], str | None] | None = None,
         madry: bool = False):
    """A config field: default, one-line doc (used for the README table), value check."""
    metadata = {"doc": doc, "check": check, "madry": madry}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _positive(v):
    return None if v > 0 else "a value > 0"


def _non_negative(v):
    return None if v >= 0 else "a value >= 0"


def _one_of(*choices):
    def check(v):
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)
    return check


def _inference_mode_error(v) -> str | None:
    """The registry of inference modes (`madry_ns.inference`) decides what `inference_bn`
    may be, so that a registered mode is a valid config value without an edit here."""
    from madry_ns import inference

    if v in inference.MODES:
        return None
    return "one of " + ", ".join(repr(k) for k in inference.MODES)


def rna_candidate_error(name) -> str | None:
    """Why `name` is not an RNA candidate, or None: 'bn', 'in', 'ln' or 'gn_<groups>'."""
    if name in ("bn", "in", "ln"):
        return None
    if isinstance(name, str) and name.startswith("gn_") and name[3:].isdigit() \
            and int(name[3:]) >= 1:
        return None
    return (f"RNA candidate {json.dumps(name)} is not one of 'bn', 'in', 'ln' or "
            f"'gn_<groups>' (e.g. 'gn_4')")


def _rna_candidates(v):
    expected = "a non-empty list of distinct names among 'bn', 'in', 'ln', 'gn_<groups>'"
    if not v or not isinstance(v, list) or len(set(map(str, v))) != len(v):
        return expected
    for name in v:
        if rna_candidate_error(name):
            return expected + f" ({rna_candidate_error(name)})"
    return None


def _schedule(v):
    expected = ("a list of [step, learning_rate] pairs whose steps start at 0 and strictly "
                "increase, with learning rates > 0, e.g. [[0, 0.1], [40000, 0.01]]")
    if not isinstance(v, list) or not v:
        return expected
    steps = []
    for pair in v:
        if (not isinstance(pair, list) or len(pair) != 2 or not _is_int(pair[0])
                or not _is_number(pair[1]) or pair[1] <= 0):
            return expected
        steps.append(pair[0])
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        return expected
    return None


def _channel_constants(v, positive: bool) -> str | None:
    expected = ("a non-empty list of numbers" + (" > 0" if positive else "")
                + ", one per image channel, on the 0-1 scale, e.g. [0.4914, 0.4822, 0.4465]")
    if not v or not all(_is_number(c) for c in v) or (positive and min(v) <= 0):
        return expected
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. Field order is Madry's, then madry_ns's."""

    # ----- Madry's keys (cifar10_challenge config.json, same names, values and scale) -----
    model_dir: str = _key("models/a_very_robust_model",
                          "Checkpoints, TensorBoard events and the config copy go here", madry=True)
    data_path: str = _key("cifar10_data", "Folder with CIFAR-10 python pickles (Madry's layout); "
                          "if absent, tensorflow_datasets' cifar10 is used. Also the folder of "
                          "CIFAR-100's pickles or the (Fashion-)MNIST IDX files", madry=True)
    tf_random_seed: int = _key(451760341, "Seed for initializers and augmentation", madry=True)
    np_random_seed: int = _key(216105420, "Seed for data order and PGD random starts", madry=True)
    max_num_training_steps: int = _key(80000, "Training steps (updates)", _positive, madry=True)
    num_output_steps: int = _key(100, "Console report every N steps", _positive, madry=True)
    num_summary_steps: int = _key(100, "TensorBoard summaries every N steps", _positive, madry=True)
    num_checkpoint_steps: int = _key(1000, "Checkpoint every N steps", _positive, madry=True)
    training_batch_size: int = _key(128, "Training batch size", _positive, madry=True)
    step_size_schedule: list = _key(
        [[0, 0.1], [40000, 0.01], [60000, 0.001]], "Piecewise-constant learning rate [[step, lr], ...]", _schedule,
        madry=True)
    weight_decay: float = _key(0.0002, "L2 factor on conv and dense kernels (x sum(W^2)/2)",
                               _non_negative, madry=True)
    momentum: float = _key(0.9, "Momentum, TF1 MomentumOptimizer semantics",
                           lambda v: None if 0 <= v < 1 else "a value in [0, 1)", madry=True)
    num_eval_examples: int = _key(10000, "First N test images used by eval, pgd_attack, run_attack",
                                  _positive, madry=True)
    eval_batch_size: int = _key(100, "Evaluation batch size", _positive, madry=True)
    eval_on_cpu: bool = _key(False, "Evaluate on the CPU even when a GPU is present", madry=True)
    epsilon: float = _key(8.0, "L-inf radius on the 0-255 scale", _positive, madry=True)
    num_steps: int = _key(10, "PGD iterations", _positive, madry=True)
    step_size: float = _key(2.0, "PGD step on the 0-255 scale", _positive, madry=True)
    random_start: bool = _key(True, "PGD uniform random start in [-epsilon, epsilon]", madry=True)
    loss_func: str = _key("xent", "PGD loss: 'xent' (summed cross-entropy) or 'cw' (margin 50)",
                          _one_of(*LOSS_FUNCS), madry=True)
    store_adv_path: str = _key("attack.npy", "Where pgd_attack.py writes and run_attack.py reads "
                               "adversarial examples", madry=True)

    # ----- madry_ns keys (defaults keep Madry's behaviour) -----
    model: str = _key("madry_wrn", "'madry_wrn' (Madry's WRN-34), 'resnet20', or the RNA code's "
                      "PyTorch 'resnet18' and 'wrn34' (WRN-34-10: pre-activation, ReLU, 1x1-conv "
                      "shortcuts)", _one_of(*MODELS))
    model_width: int | None = _key(
        None, "Width; null = the model's standard width (10 for madry_wrn: Madry's "
        "16/160/320/640; 1 for resnet20: 16/32/64; 64 for resnet18: first-stage filters "
        "64/128/256/512; 10 for wrn34). madry_wrn width 1 is the narrow 16/16/32/64 variant "
        "Madry's code mentions; resnet18 width 8 (8/16/32/64) is CPU-sized", _positive)
    input_normalization: str = _key(
        "per_image", "What the model does to its 0-255 input: 'per_image' (Madry's "
        "tf.image.per_image_standardization), 'channel' ((x/255 - input_mean) / input_std: "
        "RNA's and RobustBench's PyTorch models) or 'none' (x/255 only: TRADES' WRN-34-10 "
        "takes 0-1 images). epsilon and step_size stay on the 0-255 scale",
        _one_of(*INPUT_NORMALIZATIONS))
    input_mean: list = _key(
        list(CIFAR10_MEAN), "With input_normalization 'channel': the mean of each channel on "
        "the 0-1 scale (default CIFAR-10's, as RNA and RobustBench use it)",
        lambda v: _channel_constants(v, positive=False))
    input_std: list = _key(
        list(CIFAR10_STD), "With input_normalization 'channel': the standard deviation of each "
        "channel on the 0-1 scale (default CIFAR-10's)",
        lambda v: _channel_constants(v, positive=True))
    norm_layer: str = _key("bn", "'bn' (batch norm) or 'rna' (Random Normalization Aggregation: "
                           "each batch norm becomes a random choice among rna_candidates; "
                           "the final BN of madry_wrn and wrn34 stays BN, as released)",
                           _one_of("bn", "rna"))
    rna_candidates: list = _key(
        ["bn", "in"], "RNA candidates: 'bn', 'in' (instance norm with affine), 'ln' (layer "
        "norm) and 'gn_<groups>'; each with its own parameters. Released: bn and in",
        _rna_candidates)
    rna_sampling: str = _key(
        "per_layer", "RNA path sampling: 'per_layer' (each layer independently, the released "
        "--mixed) or 'network' (one candidate for every layer)", _one_of("per_layer", "network"))
    rna_train_path: str = _key(
        "resample", "RNA training: the update runs on a path 'resample'd after the attack (the "
        "released 'black-box adversarial training') or on the 'same' path the attack used",
        _one_of("resample", "same"))
    rna_inference_path: str = _key(
        "fresh", "RNA in eval.py, pgd_attack.py, run_attack.py: 'fresh' (a new random path for "
        "every forward; the PGD attacker draws its own path: the paper's protocol) or 'fixed' "
        "(one seeded path, from inference_seed, for attack and classification)",
        _one_of("fresh", "fixed"))
    dataset: str = _key(
        "cifar10", "The data (`madry_ns.data.REGISTRY`): " + "; ".join(
            f"'{s.name}' ({s.doc})" for s in data.REGISTRY.values()) + "; or "
        f"'{data.TFDS_PREFIX}<name>', any image-classification dataset of tensorflow_datasets "
        f"(e.g. '{data.TFDS_PREFIX}svhn_cropped')", data.name_error)
    tfds_download: bool = _key(
        False, "Let tensorflow_datasets download and prepare a missing dataset (needs network); "
        "false: a missing one is an error at once, with instructions")
    augmentation: str = _key("madry", "Training augmentation: 'madry' (zero-pad to 36, random "
                             "32x32 crop, random flip), 'crop' (no flip), 'pad4_flip' (PyTorch's "
                             "RandomCrop(32, padding=4) + flip: RNA, TRADES) or 'none'",
                             _one_of("madry", "crop", "pad4_flip", "none"))
    training_method: str = _key("madry", "'madry' (PGD adversarial training), 'trades' (KL "
                                "attack, CE + beta KL update) or 'natural' (clean batches)",
                                _one_of(*TRAINING_METHODS))
    train_attack_bn_mode: str = _key(
        "batch_update", "BN mode of the training attack: 'batch_update' (Madry: every attack step "
        "updates the moving averages), 'batch_frozen' (batch statistics, no update) or "
        "'population'", _one_of(*BN_MODES))
    weight_decay_variables: str = _key(
        "kernels", "What weight_decay covers: 'kernels' (conv and dense kernels, Madry) or 'all' "
        "trainable variables (PyTorch SGD's weight_decay: the RNA code)",
        _one_of("kernels", "all"))
    on_nonfinite: str = _key(
        "stop", "A non-finite loss, gradient or weight: 'stop' (exit non-zero, last good "
        "checkpoint kept as latest) or 'skip' (skip and log the batch)", _one_of("stop", "skip"))
    precision: str = _key(
        "float32", "'float32', 'mixed_float16' (GPU: float16 compute, float32 variables and BN "
        "statistics, dynamic loss scaling) or 'mixed_bfloat16' (no loss scaling; CPUs with "
        "AVX512_BF16, TPUs)", _one_of("float32", "mixed_float16", "mixed_bfloat16"))
    distribution: str = _key(
        "none", "'none', 'mirrored' (tf.distribute.MirroredStrategy over the GPUs, or logical "
        "CPUs) or 'multi_worker' (MultiWorkerMirroredStrategy, cluster from TF_CONFIG); "
        "training_batch_size is the global batch", _one_of("none", "mirrored", "multi_worker"))
    bn_sync: str = _key(
        "per_replica", "BN statistics across replicas: 'per_replica' (each replica's own batch; "
        "moving statistics averaged before every checkpoint) or 'synchronized' (over the "
        "global batch)", _one_of("per_replica", "synchronized"))
    worker_timeout_seconds: int = _key(
        600, "multi_worker: a collective waiting longer than this for a peer fails the run "
        "(then restart every worker to resume)", _positive)

    # ----- batch-norm shaping (Zhang & Ma, ICTAI 2022) -----
    shaping_ratio: int = _key(0, "n of the n:1 clean:attacked training mix; 0 = off (Madry), "
                              "the paper uses 3 (48 clean + 16 attacked of 64)", _non_negative)
    shaping_mode: str = _key(
        "attack_and_train", "'attack_and_train' (the method: the attack runs through the mixed "
        "batch's statistics) or 'train_only' (whole batch attacked, then mixed for the update)",
        _one_of("attack_and_train", "train_only"))
    shaping_attack_loss: str = _key(
        "batch", "Attack loss under shaping: 'batch' (summed over all m samples, paper Eq. 5) "
        "or 'attacked' (the attacked slice only)", _one_of("batch", "attacked"))
    trades_beta: float = _key(6.0, "TRADES beta: update = CE(clean) + beta * KL(p_clean || p_adv)",
                              _non_negative)
    trades_init_std: float = _key(0.255, "TRADES attack start x + std * N(0, 1), 0-255 scale "
                                  "(TRADES' 0.001 on the 0-1 scale)", _non_negative)
    shaping_trades_update: str = _key(
        "ce", "TRADES with shaping: update with 'ce' on the mixed batch (the paper disabled KL in "
        "the training loss) or 'trades' (CE + beta KL on the mixed batch)",
        _one_of("ce", "trades"))
    inference_bn: str = _key(
        "population", "How test inputs are classified: 'population' (moving statistics, Madry), "
        "'batch' (each test batch's own statistics) or 'shaped' (each test chunk mixed with clean "
        "training images, batch statistics)", lambda v: _inference_mode_error(v))
    inference_ratio: int = _key(9, "Shaped inference test:clean 1:r (paper 1:9 at batch 100)",
                                _non_negative)
    inference_mixing: str = _key(
        "per_batch", "Shaped inference: 'per_batch' (eval_batch_size/(r+1) test samples share a "
        "forward with the references, as the paper's experiments) or 'per_sample' (Eq. 6: each "
        "test sample with its own r references)", _one_of("per_batch", "per_sample"))
    inference_references: str = _key(
        "fresh", "Shaped inference references: 'fresh' (new draw for every forward) or 'fixed' "
        "(one seeded draw reused, as the exact adaptive attack assumes)", _one_of("fresh", "fixed"))
    inference_seed: int = _key(0, "Seed for drawing shaped-inference reference images")
    eval_attack_bn: str = _key(
        "inference", "What eval/pgd_attack's PGD differentiates through: 'inference' (the same "
        "forward that classifies: adaptive) or 'population' (the paper's transfer from PN)",
        _one_of("inference", "population"))

    # ----- BN-only fine-tuning (Walter, Stutz & Schiele, fragile features; madry_ns.finetune) -----
    trainable: str = _key(
        "all", "What trains: 'all'; 'bn_stats' (BN statistics only, no parameter update); "
        "'bn_affine' (BN gamma/beta, statistics frozen: population-mode forward); "
        "'bn_affine_batch' (BN gamma/beta through batch statistics, moving statistics frozen: "
        "batch_frozen forward); 'bn' (BN "
        "gamma/beta and statistics); 'bn+logits+conv1' ('bn' plus the logit layer and the "
        "first convolution)", _one_of(*TRAINABLE))
    init_checkpoint: str | None = _key(
        None, "Start from this model_dir or checkpoint prefix: weights and BN statistics, "
        "fresh optimizer at step 0 (model_dir's own latest checkpoint takes precedence)")
    reset_bn_stats: bool = _key(
        False, "With init_checkpoint: reset the BN moving mean/variance to 0/1 before "
        "training (BN STATS (reset))")
    max_to_keep: int = _key(
        3, "Checkpoints kept in model_dir, the newest (Madry's tf.train.Saver(max_to_keep=3)); "
        "0 keeps every one", _non_negative)
    select_best: str = _key(
        "none", "Best-checkpoint selection, by PGD at every checkpoint, kept as "
        "model_dir/best/checkpoint-<step> with best/selection.json: 'none'; 'heldout' "
        "(select_examples training images, drawn from the seed stream 'select_heldout', are "
        "held out of training and measured: the training set is that much smaller); 'test' "
        "(the released RNA code's choice: the first select_examples TEST images, optimistic, "
        "labelled so). Ties keep the earlier step", _one_of(*SELECT_BEST))
    select_examples: int = _key(
        1000, "With select_best: how many images the selection measures (held-out training "
        "images, or the first test images)", _positive)
    select_num_steps: int = _key(
        20, "With select_best: PGD steps of the selection attack (the released RNA code's "
        "PGD-20); epsilon, step_size, loss_func, random_start and the inference settings are "
        "the config's, as eval.py uses them", _positive)
    save_keras: bool = _key(
        False, "Also write the final model as model_dir/model.keras (Keras' format: "
        "madry_ns.load_model, or keras.saving.load_model after import madry_ns, reads it)")

    def replace(self, **changes) -> "Config":
        """A copy with some keys changed, validated like a loaded file."""
        return from_dict({**self.to_dict(), **changes}, source="<replace>")

    def to_dict(self) -> dict:
        """Every key, in field order (Madry's first)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Resolved config as JSON, the form copied into model_dir."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_EXPECTED_TYPE = {int: "an integer", float: "a number", bool: "true or false",
                  str: "a string", list: "a list"}


def fields() -> Sequence[dataclasses.Field]:
    """The config fields in order, for documentation and tests."""
    return dataclasses.fields(Config)


def default_value(name: str) -> Any:
    """The default of one key (a fresh copy for lists)."""
    f = _FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_ok(kind, value) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_number(value)
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind)


def from_dict(raw: dict, source: str = "config") -> Config:
    """Validate a mapping of keys to JSON values and build a `Config`.

    Every problem is collected and reported together, one line each.
    """
    problems = []
    values = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{key}'{hint}")
            continue
        values[key] = value
    for name, f in _FIELDS.items():
        value = values.get(name, default_value(name))
        optional = f.type.endswith(" | None")
        kind = {"int": int, "float": float, "bool": bool, "str": str,
                "list": list}[f.type.removesuffix(" | None")]
        if optional and value is None:
            values[name] = None
            continue
        if not _type_ok(kind, value):
            problems.append(f"key '{name}' has value {json.dumps(value)}, expected "
                            f"{_EXPECTED_TYPE[kind]}" + (" or null" if optional else ""))
            continue
        written = value  # quoted in messages as the user wrote it (1, not 1.0)
        if kind is float:
            value = float(value)
        check = f.metadata["check"]
        expected = check(value) if check else None
        if expected:
            problems.append(f"key '{name}' has value {json.dumps(written)}, expected {expected}")
        values[name] = value
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  - " + "\n  - ".join(problems))
    config = Config(**values)
    _check_consistency(config, source)
    return config


def shaping_split(batch_size: int, ratio: int) -> tuple[int, int]:
    """(clean, attacked) sizes of an n:1 shaping batch: k = floor(n m / (n + 1)) clean."""
    clean = ratio * batch_size // (ratio + 1)
    return clean, batch_size - clean


def _check_consistency(c: "Config", source: str) -> None:
    """Checks that involve several keys."""
    problems = []
    if c.shaping_ratio:
        clean, attacked = shaping_split(c.training_batch_size, c.shaping_ratio)
        if clean < 1 or attacked < 1:
            problems.append(
                f"shaping_ratio {c.shaping_ratio} with training_batch_size "
                f"{c.training_batch_size} leaves {clean} clean and {attacked} attacked samples; "
                f"both need at least 1 (use a larger batch or a smaller ratio)")
        if c.training_method == "natural":
            problems.append("shaping_ratio > 0 needs an adversarial training_method "
                            "('madry' or 'trades'), not 'natural'")
        if c.shaping_mode == "attack_and_train" and c.train_attack_bn_mode == "population":
            problems.append("shaping_mode 'attack_and_train' runs the attack through the mixed "
                            "batch's statistics; train_attack_bn_mode must be 'batch_update' or "
                            "'batch_frozen', not 'population'")
    if c.norm_layer == "rna":
        if c.inference_bn == "shaped":
            problems.append("norm_layer 'rna' classifies with random paths; inference_bn "
                            "'shaped' is for batch-norm shaping ('population' or 'batch')")
        if c.eval_attack_bn == "population" and c.inference_bn != "population":
            problems.append("norm_layer 'rna': the eval attack runs through the inference "
                            "forward on its own path; eval_attack_bn 'population' with "
                            "inference_bn 'batch' is not supported")
    from madry_ns import inference

    mode_problem = inference.get(c.inference_bn).check(c)
    if mode_problem:
        problems.append(mode_problem)
    if c.trainable in FROZEN_STATISTICS and c.train_attack_bn_mode == "batch_update":
        problems.append(f"trainable '{c.trainable}' keeps the BN statistics frozen, but "
                        "train_attack_bn_mode 'batch_update' would update them at every attack "
                        "step; use 'population' (the paper's attack on the eval-mode model) or "
                        "'batch_frozen'")
    if c.input_normalization != "channel":
        for key in ("input_mean", "input_std"):
            if getattr(c, key) != default_value(key):
                problems.append(f"{key} {getattr(c, key)} is used only with "
                                f"input_normalization 'channel', not "
                                f"'{c.input_normalization}'")
    if len(c.input_mean) != len(c.input_std):
        problems.append(f"input_mean {c.input_mean} and input_std {c.input_std} need the "
                        f"same length (one value per channel)")
    if c.reset_bn_stats and not c.init_checkpoint:
        problems.append("reset_bn_stats resets the statistics loaded from init_checkpoint, but "
                        "init_checkpoint is not set (a fresh model starts at 0/1 anyway)")
    if c.reset_bn_stats and c.trainable in FROZEN_STATISTICS:
        problems.append(f"reset_bn_stats with trainable '{c.trainable}' would freeze the "
                        "statistics "
                        "at mean 0 / variance 1; reset only where they are re-estimated "
                        "('bn_stats', 'bn', 'bn+logits+conv1', 'all')")
    if c.select_best == "none":
        for key in ("select_examples", "select_num_steps"):
            if getattr(c, key) != default_value(key):
                problems.append(f"{key} {getattr(c, key)} is used only with select_best "
                                f"'heldout' or 'test', not 'none'")
    elif c.distribution == "multi_worker":
        problems.append(f"select_best '{c.select_best}' is not supported with distribution "
                        f"'multi_worker' (the selection evaluates on one process); use "
                        f"'none' or 'mirrored', or select_best 'none' and evaluate the "
                        f"checkpoints afterwards (max_to_keep 0 keeps every one)")
    if problems:
        raise ConfigError(f"{source}: inconsistent configuration:\n  - " + "\n  - ".join(problems))


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen and not key.startswith("_"):
            raise ConfigError(f"key '{key}' appears twice (only '_' comment keys may repeat)")
        seen[key] = value
    return seen


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from `--set`; the value is JSON when it parses, else a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set epsilon=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def load(path: str = "config.json", overrides: Sequence[str] = ()) -> Config:
    """Read and validate a config file, then apply `key=value` overrides."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found (working directory: {os.getcwd()}); "
                          f"pass --config PATH") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                          f"{e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of keys to values, "
                          f"found {type(raw).__name__}")
    for text_override in overrides:
        key, value = parse_override(text_override)
        raw[key] = value
    source = path + (" with --set " + " ".join(overrides) if overrides else "")
    return from_dict(raw, source=source)


def readme_table() -> str:
    """Markdown table of the madry_ns keys (README section "Configuration")."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields():
        if not f.metadata["madry"]:
            rows.append(f"| `{f.name}` | `{json.dumps(default_value(f.name))}` | "
                        f"{f.metadata['doc']} |")
    return "\n".join(rows)
