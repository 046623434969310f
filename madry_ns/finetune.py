"""What trains: full training, or only the batch-norm layers (fragile-features study).

Walter, Stutz & Schiele, "On Fragile Features and Batch Normalization in Adversarial
Training" fine-tune a normally trained ResNet-20 adversarially with everything frozen but
(parts of) its BN layers, and train BN-only networks from scratch. The config key `trainable`
selects the regime:

| `trainable`        | updated by the optimizer           | BN statistics | paper (Table 2)   |
|--------------------|------------------------------------|---------------|-------------------|
| `all`              | every parameter                    | updated       | NORMAL / ADV      |
| `bn_stats`         | nothing                            | updated       | BN STATS          |
| `bn_affine`        | gamma, beta of every BN            | frozen        | BN ONLY PARAMS    |
| `bn_affine_batch`  | gamma, beta of every BN            | frozen        | BN ONLY PARAMS    |
| `bn`               | gamma, beta of every BN            | updated       | BN PARAMS, + BN ONLY |
| `bn+logits+conv1`  | the above + logit layer + 1st conv | updated       | ... + log + conv1 |

(The logit layer and the first convolution are the model's `logit_layer()` and
`first_conv()`.)

(+ BN ONLY: `bn` from scratch, without `init_checkpoint`.)

"Updated" statistics come from the training forward in `batch_update` mode (the
adversarial examples, for an adversarial `training_method`), the layer's exponential moving
average (momentum 0.9, PyTorch's 0.1). "Frozen" means the training forward runs in
`population` mode: the loss the parameters descend is the one inference computes, and the
statistics keep the values of `init_checkpoint` (the paper's "statistics frozen at their
clean values"). `bn_affine` is the paper's BN ONLY PARAMS; the name avoids the paper's
"BN PARAMS", which means statistics *and* parameters (`bn` here).

`bn_affine_batch` is the other reading of BN ONLY PARAMS: gamma and beta descend the loss of
a forward that normalizes with each training batch's statistics (PyTorch's `model.train()`
with the running statistics kept from updating), in `batch_frozen` mode, while the moving
statistics stay those of `init_checkpoint`; inference then uses those frozen statistics. The
paper does not say which it ran; its 77.11% clean error suggests a mismatch between the
normalization gamma/beta were trained through and the one they are tested with, which this
variant has and `bn_affine` does not, so both are offered and recorded.

What trains is chosen by the variable list handed to the optimizer, never by Keras'
`layer.trainable = False`, which would also switch a Keras BN layer to inference mode.
Frozen variables get no gradient, no optimizer slot and no weight decay (decay covers the
kernels among the trainable variables: none for the BN-only regimes), so they stay
bit-identical.

Starting point (train.py's resume order, `initialize`): 1. the latest checkpoint in
model_dir (resume: weights, statistics, optimizer and step); 2. else `init_checkpoint`
(weights and BN statistics only; a fresh optimizer at step 0), with the moving statistics
reset to mean 0 / variance 1 first when `reset_bn_stats` is set; 3. else a fresh model.
"""

from __future__ import annotations

import numpy as np

from madry_ns import checkpoints
from madry_ns.config import TRAINABLE

__all__ = ["TRAINABLE", "trainable_variables", "decay_variables", "forward_bn_mode",
           "report_bn_mode", "reset_bn_statistics", "initialize", "parameter_counts",
           "describe"]

# What each regime means, for the start-of-training line and the docs.
DESCRIPTION = {
    "all": "every parameter; BN statistics updated by the training forward",
    "bn_stats": "no parameter; BN statistics updated by the training forward",
    "bn_affine": "gamma and beta of every BN layer; BN statistics frozen (population mode)",
    "bn_affine_batch": "gamma and beta of every BN layer, trained through batch statistics; "
                       "BN moving statistics frozen (batch_frozen mode)",
    "bn": "gamma and beta of every BN layer; BN statistics updated by the training forward",
    "bn+logits+conv1": "gamma and beta of every BN layer, the logit layer and the first "
                       "convolution; BN statistics updated by the training forward",
}


def trainable_variables(model, config) -> list:
    """The variables the optimizer updates under `config.trainable`, in model order."""
    regime = config.trainable
    if regime == "all":
        return list(model.trainable_variables)
    if regime == "bn_stats":
        return []
    chosen = [v for bn in model.bn_layers() for v in (bn.gamma, bn.beta)]
    if regime == "bn+logits+conv1":
        logit = model.logit_layer()
        chosen += [model.first_conv().kernel, logit.kernel, logit.bias]
    ids = {id(v) for v in chosen}
    return [v for v in model.trainable_variables if id(v) in ids]


def decay_variables(model, config) -> list:
    """Madry's decayed kernels (conv and dense) that also train: decay on a frozen kernel
    would only add a constant to the reported loss."""
    ids = {id(v) for v in trainable_variables(model, config)}
    return [v for v in model.decay_variables() if id(v) in ids]


def forward_bn_mode(config) -> str:
    """BN mode of the training forward: `population` keeps the statistics frozen
    (`bn_affine`), `batch_frozen` normalizes with the batch without learning its statistics
    (`bn_affine_batch`); every other regime normalizes with, and learns, batch statistics."""
    return {"bn_affine": "population",
            "bn_affine_batch": "batch_frozen"}.get(config.trainable, "batch_update")


def report_bn_mode(config) -> str:
    """BN mode of the console's clean-accuracy forward: the training forward's
    normalization, without touching the moving averages."""
    return "population" if config.trainable == "bn_affine" else "batch_frozen"


def reset_bn_statistics(model) -> None:
    """Moving mean 0 and moving variance 1 in every BN layer (their initial values)."""
    for bn in model.bn_layers():
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, np.float32))
        bn.moving_variance.assign(np.ones(bn.moving_variance.shape, np.float32))


def initialize(model, config, out=print) -> str | None:
    """Load `init_checkpoint` (weights and BN statistics, no optimizer state) into `model`
    and reset the statistics if `reset_bn_stats`; return the checkpoint path, or None when
    the config names none. Call only when model_dir has no checkpoint of its own."""
    if not config.init_checkpoint:
        return None
    path = checkpoints.resolve(config.init_checkpoint)
    checkpoints.load_weights(model, path)
    out(f"Initialized from {path}: weights and BN statistics (optimizer fresh, step 0)")
    if config.reset_bn_stats:
        reset_bn_statistics(model)
        out("BN moving statistics reset to mean 0, variance 1")
    return path


def _size(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


def parameter_counts(model, config) -> dict:
    """Trainable and total parameter counts (BN statistics are not parameters, as in
    PyTorch's `model.parameters()`), and the BN affine share."""
    total = _size(model.trainable_variables)
    bn_affine = _size([v for bn in model.bn_layers() for v in (bn.gamma, bn.beta)])
    return {"total": total, "trainable": _size(trainable_variables(model, config)),
            "bn_affine": bn_affine, "bn_channels": bn_affine // 2,
            "bn_layers": len(model.bn_layers())}


def describe(model, config) -> str:
    """One line for the start of training: the regime and its share of the parameters."""
    c = parameter_counts(model, config)
    return (f"Trainable ({config.trainable}): {DESCRIPTION[config.trainable]}: "
            f"{c['trainable']:,} of {c['total']:,} parameters "
            f"({100.0 * c['trainable'] / c['total']:.3g}%); the {c['bn_layers']} BN layers' "
            f"gamma and beta are {c['bn_affine']:,} ({100.0 * c['bn_affine'] / c['total']:.3g}%)")
