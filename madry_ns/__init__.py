"""madry_ns: a TF2/Keras successor to MadryLab's cifar10_challenge.

`import madry_ns` is light (no TensorFlow); `madry_ns.load_model`, `madry_ns.evaluate_model`
and `madry_ns.AdversarialTrainer` import it on first use.

`AdversarialTrainer(model, config=None, **settings)` trains one of the toolkit's models (or a
plain Keras classifier) adversarially through Keras' `fit`, with train.py's step; see
`madry_ns.fit` for a runnable example and how it differs from train.py.
"""


def load_model(path: str):
    """A Keras model with the weights of a checkpoint: a model_dir (its latest checkpoint)
    or a checkpoint prefix, in Madry's TF1 format (fetch_model.py) or ours, or a `.keras`
    file saved from one of the toolkit's models.

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
