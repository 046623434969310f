"""madry_ns: a TF2/Keras successor to MadryLab's cifar10_challenge.

`import madry_ns` is light (no TensorFlow), so a command fails on a bad config in
milliseconds; `madry_ns.load_model`, `madry_ns.evaluate_model` and
`madry_ns.AdversarialTrainer` import TensorFlow on first use. Yet Keras knows the
toolkit's model and layer classes as soon as it is up: whether TensorFlow and Keras were
imported before `import madry_ns` or are imported after it, `madry_ns.models` is imported
(registering its classes) the moment both have finished importing, so that
`keras.saving.load_model("m.keras")` restores a toolkit model with nothing else imported.

`AdversarialTrainer(model, config=None, **settings)` trains one of the toolkit's models (or a
plain Keras classifier) adversarially through Keras' `fit`, with train.py's step; see
`madry_ns.fit` for a runnable example and how it differs from train.py.
"""

import importlib.abc
import sys

# Keras' deserializer finds classes outside Keras only in its registry, which the decorators
# of madry_ns.models and madry_ns.layers fill when those modules are imported.
_WAITED_FOR = ("tensorflow", "keras")


def _finished(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _register_with_keras() -> None:
    import madry_ns.models  # noqa: F401  (its import registers models and layers)


class _RegisterWhenKerasIsUp(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: it wraps the loaders of `tensorflow` and `keras`
    (each imports the other midway) and registers once the second has finished."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WAITED_FOR:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if all(other == name or _finished(other) for other in _WAITED_FOR):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register_with_keras()

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if all(_finished(name) for name in _WAITED_FOR):
    _register_with_keras()
else:
    sys.meta_path.insert(0, _RegisterWhenKerasIsUp())


def load_model(path: str):
    """A Keras model with the weights of a checkpoint: a model_dir (its latest checkpoint)
    or a checkpoint prefix, in Madry's TF1 format (fetch_model.py) or ours, or a `.keras`
    file saved from one of the toolkit's models (`model.save`, or train.py's
    `model_dir/model.keras` with `save_keras: true`).

    The model maps float images on the 0-255 scale, shape (N, H, W, C) of its dataset
    (CIFAR-10: 32, 32, 3), to logits; call it
    as `model(x)` (BN with population statistics) or `model(x, bn_mode=...)`.
    See `madry_ns.checkpoints.load_model`.
    """
    from madry_ns import checkpoints

    return checkpoints.load_model(path)


def evaluate_model(model, x, y, **kwargs):
    """The evaluation suite on arrays: `model` (any Keras model mapping images to logits)
    on images `x` and labels `y`, under the suite's attacks and inference modes; returns a
    `madry_ns.evaluate.Result` (`.markdown()`, `.to_json()`, `.save(folder)`,
    `.to_dataframe()`, `.accuracy`, `.per_image`, ...). Keywords: `epsilon` (on the images'
    `pixel_scale`, 255.0 or 1.0), `attacks`, `modes`, `references`, `batch_size`, `seed`,
    `num_steps`, `step_size`, budgets; see `madry_ns.evaluate.api.evaluate_model`."""
    from madry_ns.evaluate.api import evaluate_model as run

    return run(model, x, y, **kwargs)


def __getattr__(name):
    # AdversarialTrainer is a keras.Model subclass: defined only once TensorFlow is wanted.
    if name == "AdversarialTrainer":
        from madry_ns.fit import AdversarialTrainer

        return AdversarialTrainer
    raise AttributeError(f"module 'madry_ns' has no attribute {name!r}")


__all__ = ["AdversarialTrainer", "evaluate_model", "load_model"]
