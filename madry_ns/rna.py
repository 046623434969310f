"""Random Normalization Aggregation (Dong et al., NeurIPS 2022): training and path helpers.

The layer is `layers.RandomNorm`; the path API (`rna_layers`, `resample`, `set_path`, `path`)
is on every model (`rna_paths.RandomPaths`). This module ties them to training and inference.

Training as released (UniSerj/Random-Norm-Aggregation `train.py`), per batch: draw a path,
run the whole PGD attack on it, draw another path ("black-box adversarial training"), update
on the adversarial batch through it. `rna_train_path: "same"` updates on the attacked path
instead. Path draws are stateless functions of (np_random_seed, step), like the PGD random
start, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from madry_ns import seeds

# Streams folded into (np_random_seed, step): the attack's path and the update's path.
ATTACK_PATH_STREAM = seeds.STREAMS["rna_attack_path"]
TRAIN_PATH_STREAM = seeds.STREAMS["rna_train_path"]
# The helpers live in madry_ns.seeds; these names are kept for existing callers.
fold = seeds.fold
training_seed = seeds.training


def has_rna(model) -> bool:
    """Whether `model` has RNA layers (and so a random path)."""
    return bool(getattr(model, "rna_layers", list)())


def with_random_paths(model, config, adversary):
    """The training adversary `fn(x, y, step) -> (x_train, p_clean)` with RNA's paths.

    Before the attack: a path from fold(seed, ATTACK_PATH_STREAM). After it, unless
    `rna_train_path` is "same" or nothing was attacked (natural training): a new path from
    fold(seed, TRAIN_PATH_STREAM), which the update then runs on (TRADES' clean forward
    too). Returns `adversary` itself for a model without RNA layers.
    """
    if not has_rna(model):
        return adversary
    resample_after = config.rna_train_path == "resample" and \
        config.training_method != "natural"

    def adversary_on_paths(x, y, step):
        seed = training_seed(config, step)
        model.resample(fold(seed, ATTACK_PATH_STREAM))
        out = adversary(x, y, step)
        if resample_after:
            model.resample(fold(seed, TRAIN_PATH_STREAM))
        return out

    return adversary_on_paths


def forward_on_path(model, bn_mode: str):
    """`fn(x, path_seed) -> logits`: draw the path of `path_seed`, make it active, forward.

    Traced into the caller's tf.function; the same seed always gives the same path."""

    def forward(x, path_seed):
        model.resample(path_seed)
        return model(x, bn_mode=bn_mode)

    return forward
