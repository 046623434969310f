"""madry_ns: a TF2/Keras successor to MadryLab's cifar10_challenge.

`import madry_ns` is light (no TensorFlow); `madry_ns.load_model` imports it on first use.
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


__all__ = ["load_model"]
