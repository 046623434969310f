"""How test inputs are classified: the inference modes, in one registry.

A mode is keyed by the config's own `inference_bn` value and gives

* the classify forward `fn(x, seed) -> logits`, traceable into a `tf.function` (the seed
  drives whatever the mode draws: shaped inference's reference images; modes that draw
  nothing ignore it),
* the forward an adaptive attack differentiates (`Forward.attack`: the same function on the
  attacker's own draw, `seeds.attacker_draw`; for modes that draw nothing, or draw once and
  reuse, it is the very forward that classifies),
* the labels that say how inputs were classified (in full and short, for table columns),
* whether it is per image and deterministic (a batch-statistics forward is neither: one
  image's logits depend on its batch companions).

Every caller goes through `forward(model, config, dataset)`: eval.py, pgd_attack.py,
run_attack.py (`evaluation.Classifier`), the evaluation suite's columns, the RNA protocols and
the fragile-features study. A model with RNA layers classifies on a random path on top of the
mode (`rna_inference_path`: a fresh path from each call's seed, or one fixed path), the same
wrapper for every mode that runs the network once per forward.

Adding a mode is one `register(Mode(...))` call: the config check, eval.py and the suite's
`--modes` read this registry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from madry_ns import seeds
from madry_ns.errors import ConfigError

# The suite's column names before they took the config's vocabulary: accepted as aliases.
ALIASES = {"pn": "population", "bn": "batch"}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One inference mode.

    `build(model, config, dataset)` returns `fn(x, seed) -> logits`; `label(config, seeding)`
    the full description of how an image is classified (`seeding` says how the caller seeds
    the mode's draws, or None for the config's own); `short(config)` the column name;
    `adaptive(config)` how an attack through this forward is made; `check(config)` returns
    an error text when the config cannot run the mode (None otherwise).
    """

    key: str
    build: Callable
    label: Callable
    short: Callable
    adaptive: Callable
    bn_mode: str | None = None  # the BN layers' mode, when the mode is one network forward
    per_image: bool = False  # each image's logits depend on that image alone
    draws: bool = False  # the forward draws from its seed (so an attacker may draw apart)
    needs_toolkit_bn: bool = True  # needs the toolkit's BN layers (bn_mode=...)
    check: Callable = lambda config: None
    detail: Callable | None = None  # a short label with the mode's settings (eval.py)

    def tag(self, config) -> str:
        """The short label with the mode's settings, for eval.py's metrics tables."""
        return (self.detail or self.short)(config)


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add `mode` to the registry (a later registration under the same key replaces it)."""
    MODES[mode.key] = mode
    return mode


def get(key: str) -> Mode:
    """The mode of `key` (or of an old suite alias), or a ConfigError naming the modes."""
    mode = MODES.get(ALIASES.get(key, key))
    if mode is None:
        raise ConfigError(f"inference mode {key!r}: expected one of {', '.join(MODES)}")
    return mode


def canonical(key: str) -> str:
    """`key` in the config's vocabulary ('pn' -> 'population', 'bn' -> 'batch')."""
    return get(key).key


# ------------------------------------------------------------------------------------------
# Shaped inference's arithmetic, written once


def chunk_size(batch_size: int, ratio: int, mixing: str) -> int:
    """Test images per shaped forward: 1 'per_sample' (Eq. 6), else batch_size / (1 + r)
    ('per_batch', the paper's experiments: 10 test + 90 references at 1:9, batch 100)."""
    return 1 if mixing == "per_sample" else batch_size // (ratio + 1)


def shaped_chunk(config) -> int:
    """`chunk_size` of the config's evaluation batch, ratio and mixing."""
    return chunk_size(config.eval_batch_size, config.inference_ratio, config.inference_mixing)


def shaped_split_error(config) -> str | None:
    """Why the config's eval batch cannot be split for shaped inference per batch, or None."""
    r = config.inference_ratio
    if config.inference_mixing == "per_batch" and config.eval_batch_size % (r + 1):
        return (f"eval_batch_size {config.eval_batch_size} with inference_ratio {r}: shaped "
                f"inference per batch puts eval_batch_size/(inference_ratio+1) test images in "
                f"each forward, so the batch must split into chunks of 1 + {r}: "
                f"{config.eval_batch_size} is not divisible by {r + 1} (use a multiple of "
                f"{r + 1})")
    return None


def make_shaped_inference(model, config, dataset):
    """The config's BN+Shaping inference (`shaping.ShapedInference`), with references from
    the dataset's clean, unaugmented training images."""
    from madry_ns import shaping

    fixed = [config.inference_seed, 0] if config.inference_references == "fixed" else None
    return shaping.ShapedInference(model, shaping.ReferencePool(dataset.train_images),
                                   config.inference_ratio, shaped_chunk(config),
                                   fixed_seed=fixed)


# ------------------------------------------------------------------------------------------
# The modes


def _network(bn_mode: str) -> Callable:
    def build(model, config, dataset):
        del config, dataset

        def fn(x, seed):
            del seed
            return model(x, bn_mode=bn_mode)
        return fn
    return build


def _shaped_build(model, config, dataset):
    shaped = make_shaped_inference(model, config, dataset)
    return shaped.logits


def _shaped_label(config, seeding: str | None = None) -> str:
    r, chunk = config.inference_ratio, shaped_chunk(config)
    head = f"BN+Shaping 1:{r} ({chunk} test + {r * chunk} clean training images per forward"
    if seeding is None:
        return f"{head}, {config.inference_references} references)"
    return f"{head}; {seeding})"


def _shaped_adaptive(config) -> str:
    if config.inference_references == "fixed":
        return "exact adaptive, through BN+Shaping with the inference references"
    return "adaptive, through BN+Shaping with the attacker's own reference draw"


register(Mode(
    "population", _network("population"),
    label=lambda config, seeding=None: "PN (population statistics)",
    short=lambda config: "PN",
    adaptive=lambda config: "white-box through PN",
    bn_mode="population", per_image=True, needs_toolkit_bn=False))
register(Mode(
    "batch", _network("batch_frozen"),
    label=lambda config, seeding=None:
        f"BN (statistics of each test batch of {config.eval_batch_size})",
    short=lambda config: "BN",
    adaptive=lambda config: "adaptive, through the test batch's statistics",
    detail=lambda config: f"BN (batch {config.eval_batch_size})",
    bn_mode="batch_frozen"))
register(Mode(
    "shaped", _shaped_build, label=_shaped_label,
    short=lambda config: f"BN+Shaping 1:{config.inference_ratio}",
    adaptive=_shaped_adaptive, draws=True, check=shaped_split_error,
    detail=lambda config:
        f"BN+Shaping 1:{config.inference_ratio}, {config.inference_references} refs"))


# ------------------------------------------------------------------------------------------
# Built forwards


@dataclasses.dataclass
class Forward:
    """A mode built for one model: `classify(x, seed)` and `attack(x, seed)` (the adaptive
    attacker's forward: on its own draw beside the defense's `seed` where the forward draws,
    else the same forward), both traceable; `mode` and `config` for the labels."""

    mode: Mode
    config: object
    classify: Callable
    random_path: bool = False

    def __call__(self, x, seed):
        return self.classify(x, seed)

    def attack(self, x, seed):
        return self.classify(x, seeds.attacker_draw(seed))

    @property
    def per_image(self) -> bool:
        """Deterministic and per image: an image's logits depend on nothing else."""
        return self.mode.per_image and not self.random_path

    def label(self, seeding: str | None = None) -> str:
        return self.mode.label(self.config, seeding)

    def short(self) -> str:
        return self.mode.short(self.config)


def check(config, key: str | None = None) -> None:
    """Raise ConfigError when the config cannot run mode `key` (default its inference_bn)."""
    mode = get(key or config.inference_bn)
    error = mode.check(config)
    if error:
        raise ConfigError(error)


def forward(model, config, dataset, key: str | None = None) -> Forward:
    """Mode `key` (default the config's `inference_bn`) built for `model`, on RNA's random
    paths when the model has RNA layers (`rna_inference_path`), see the module docstring."""
    from madry_ns import rna

    mode = get(key or config.inference_bn)
    check(config, mode.key)
    if mode.needs_toolkit_bn and not has_toolkit_bn(model):
        raise ConfigError(f"inference mode {mode.key!r} needs the toolkit's BN layers "
                          f"(madry_ns.layers.BatchNorm, called with bn_mode=...); this model "
                          f"has none: use 'population'")
    if mode.bn_mode is not None and rna.has_rna(model):
        on_path = path_forward(model, config, mode.key)
        if config.rna_inference_path == "fixed":
            fixed = [config.inference_seed, 0]

            def classify(x, seed):
                del seed
                return on_path(x, seeds.pair(*fixed))
        else:
            classify = on_path
        return Forward(mode, config, classify, random_path=True)
    return Forward(mode, config, mode.build(model, config, dataset))


def path_forward(model, config, key: str | None = None):
    """`fn(x, path_seed) -> logits`: mode `key` (default the config's) on the random path
    drawn from `path_seed` (RNA; a model without RNA layers ignores the seed). For modes that
    are one network forward ('population', 'batch')."""
    from madry_ns import rna

    mode = get(key or config.inference_bn)
    if mode.bn_mode is None:
        raise ConfigError(f"inference_bn {mode.key!r} cannot run on a random path; RNA "
                          f"models classify with 'population' or 'batch'")
    return rna.forward_on_path(model, mode.bn_mode)


def has_toolkit_bn(model) -> bool:
    """Whether `model` has the toolkit's BN layers (so it takes `bn_mode=...`)."""
    from madry_ns.layers import BatchNorm, RandomNorm

    return any(isinstance(layer, (BatchNorm, RandomNorm))
               for layer in getattr(model, "_flatten_layers", lambda: [])())
