"""Datasets and input pipelines.

Three sources, all giving uint8 NHWC 32x32x3 images and int64 labels:

* Madry's on-disk CIFAR-10 python pickles at `data_path` (`data_batch_1..5`, `test_batch`,
  `batches.meta`), read with a restricted unpickler that admits only the types those files
  contain, so a hostile pickle cannot run code;
* `tensorflow_datasets`' `cifar10` when `data_path` does not exist (never downloaded
  implicitly: offline, it fails at once with instructions);
* `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, offline),
  scaled from 0-16 to 0-255, enlarged 4x by pixel repetition and copied to three channels;
  test = the 300 images at `np.random.default_rng(0).permutation(1797)[:300]`, train = the
  other 1,497.

The training pipeline is Madry's: fixed batches, a fresh shuffle each pass with the tail
dropped, and per-image augmentation (zero-pad to 36x36, random 32x32 crop, random horizontal
flip). It is stateless: the order of pass e is a function of (seed, e) and the augmentation of
step s a function of (seed, s), so resuming at step s needs nothing but s.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Iterator

import numpy as np

from madry_ns.errors import DataError

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]
DIGITS_TEST_SIZE = 300
AUGMENTATIONS = ("madry", "crop", "pad4_flip", "none")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images uint8 (N, 32, 32, 3) on 0-255, labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list
    source: str


# ---------------------------------------------------------------------------------------
# Madry's pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's python batches contain: dicts, lists, bytes, numbers
    and numpy arrays. Any other global (os.system, builtins.eval, ...) is refused before it
    can be called."""

    def __init__(self, file, filename):
        super().__init__(file, encoding="bytes")
        self.filename = filename

    def find_class(self, module, name):
        import codecs
        from numpy._core import multiarray, numeric

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
            # Python 3 writes bytes as _codecs.encode(str, 'latin1') in protocols < 3.
            ("_codecs", "encode"): codecs.encode,
        }
        if (module, name) not in allowed:
            raise DataError(
                f"{self.filename}: refusing to unpickle '{module}.{name}'. A CIFAR-10 batch "
                f"holds only a dict of bytes, lists and a uint8 array; this file asks for "
                f"something else (possibly code to execute), so it was not loaded.")
        return allowed[(module, name)]


def safe_unpickle(path: str):
    """Load a pickle that may only contain CIFAR-10 batch types (see the unpickler)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found. Madry's data layout is data_batch_1..5, "
                        f"test_batch and batches.meta in data_path.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled: pickle raises many types
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e}); "
                        f"the file may be truncated or corrupted.") from None


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels' "
                        f"(CIFAR-10 python format), found {type(d).__name__}"
                        + (f" with keys {sorted(d)[:6]}" if isinstance(d, dict) else ""))
    x, labels = d[b"data"], d[b"labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
            or x.shape[1] != 3072:
        desc = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
                else type(x).__name__)
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), "
                        f"found {desc}")
    y = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else np.zeros(0)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise DataError(f"{path}: b'labels' must be a list of {len(x)} integers, one per "
                        f"image; found {type(labels).__name__} "
                        f"{getattr(y, 'dtype', '')} of length {len(y)}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, found values in "
                        f"[{y.min()}, {y.max()}]")
    # Channel-major rows (1024 R, 1024 G, 1024 B) -> NHWC, as Madry's loader.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def load_madry_pickles(data_path: str) -> Dataset:
    """CIFAR-10 from Madry's `data_path` layout (any number of images per batch)."""
    train = [_read_batch(os.path.join(data_path, f)) for f in TRAIN_FILES]
    test_x, test_y = _read_batch(os.path.join(data_path, TEST_FILE))
    meta_path = os.path.join(data_path, META_FILE)
    meta = safe_unpickle(meta_path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10 or \
            not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{meta_path}: expected a dict with b'label_names', a list of 10 "
                        f"byte strings")
    return Dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_x, test_y, [n.decode("utf-8") for n in names],
                   source=f"CIFAR-10 pickles in {data_path}")


# ---------------------------------------------------------------------------------------
# tensorflow_datasets and digits


def load_tfds_cifar10(data_dir: str | None = None) -> Dataset:
    """CIFAR-10 prepared by tensorflow_datasets (never downloads: this must work offline)."""
    import tensorflow_datasets as tfds

    try:
        splits = tfds.load("cifar10", split=["train", "test"], as_supervised=True,
                           download=False, data_dir=data_dir)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) \
            as e:
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise DataError(
            f"CIFAR-10 not found: data_path does not exist and tensorflow_datasets has no "
            f"prepared 'cifar10' in {where} ({type(e).__name__}). Either put Madry's pickles "
            f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
            f"extracted: data_batch_1..5, test_batch, batches.meta) in data_path, or, on a "
            f"machine with network access, run: python -c \"import tensorflow_datasets as "
            f"tfds; tfds.builder('cifar10').download_and_prepare()\". For an offline demo use "
            f"\"dataset\": \"digits\".") from None
    # Batched by hand: batch_size=-1 sizes one batch from the dataset's metadata and, where
    # that is missing (tfds.testing.mock_data), asks for sys.maxsize and aborts the process.
    (tx, ty), (vx, vy) = [_split_to_numpy(tfds, split) for split in splits]
    return Dataset(tx.astype(np.uint8), ty.astype(np.int64), vx.astype(np.uint8),
                   vy.astype(np.int64), list(CIFAR10_LABELS),
                   source="tensorflow_datasets cifar10")


def _split_to_numpy(tfds, split) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for x, y in tfds.as_numpy(split.batch(10000)):
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits as 32x32x3 uint8 (see the module docstring)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    small = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)          # (1797, 8, 8)
    big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)                 # (1797, 32, 32)
    images = np.repeat(big[..., None], 3, axis=3)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return Dataset(images[train], labels[train], images[test], labels[test],
                   [str(i) for i in range(10)], source="scikit-learn digits")


def load_dataset(config) -> Dataset:
    """The dataset a config names (`dataset`, `data_path`)."""
    if config.dataset == "digits":
        return load_digits()
    if os.path.isdir(config.data_path):
        return load_madry_pickles(config.data_path)
    if os.path.exists(config.data_path):
        raise DataError(f"data_path '{config.data_path}' exists but is not a directory; "
                        f"expected a folder with CIFAR-10 python pickles")
    return load_tfds_cifar10()


# ---------------------------------------------------------------------------------------
# Pipelines


def augment_batch(images, seed, mode: str = "madry"):
    """Madry's per-image augmentation on a float batch, stateless in `seed`.

    Zero-pad to 36x36, crop a random 32x32 window (offsets 0..4), and ('madry') flip left-right
    with probability 1/2. 'pad4_flip' is PyTorch's RandomCrop(32, padding=4) and
    RandomHorizontalFlip: zero-pad to 40x40, offsets 0..8, flip. The crop and flip are one
    gather per axis.
    """
    import tensorflow as tf

    if mode == "none":
        return images
    b = tf.shape(images)[0]
    pad = 4 if mode == "pad4_flip" else 2
    offsets = 2 * pad + 1
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    # One draw in [0, 2 * offsets): mod `offsets` gives the offsets, mod 2 the flip, all
    # uniform (for Madry's 5 offsets the draw is in [0, 10), as before).
    draw = tf.random.stateless_uniform([b, 3], seed=seed, minval=0, maxval=2 * offsets,
                                       dtype=tf.int32)
    rows = draw[:, 0:1] % offsets + tf.range(32)
    cols = draw[:, 1:2] % offsets + tf.range(32)
    if mode in ("madry", "pad4_flip"):
        flip = tf.equal(draw[:, 2:3] % 2, 1)
        cols = tf.where(flip, draw[:, 1:2] % offsets + 31 - tf.range(32), cols)
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def train_pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, order_seed: int,
                   augment_seed: int, start_step: int = 0, augmentation: str = "madry"):
    """`tf.data` of (step, images float32 0-255, labels) from `start_step` on, forever.

    Batch s is the same whether the pipeline started at 0 or at s.
    """
    import tensorflow as tf

    n = len(images)
    if n < batch_size:
        raise DataError(f"training_batch_size {batch_size} exceeds the {n} training images")
    per_pass = n // batch_size
    images_t = tf.constant(images)
    labels_t = tf.constant(labels, tf.int64)

    def pass_batches(p):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(order_seed, tf.int64), p]))
        return tf.data.Dataset.from_tensor_slices(
            tf.reshape(order[:per_pass * batch_size], [per_pass, batch_size]))

    first_pass, offset = divmod(start_step, per_pass)
    indices = tf.data.Dataset.range(first_pass, 2**62).flat_map(pass_batches).skip(offset)
    steps = tf.data.Dataset.range(start_step, 2**62)

    def load(step, idx):
        x = tf.cast(tf.gather(images_t, idx), tf.float32)
        seed = tf.stack([tf.constant(augment_seed, tf.int64), step])
        return step, augment_batch(x, seed, augmentation), tf.gather(labels_t, idx)

    return (tf.data.Dataset.zip((steps, indices))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def eval_batches(images: np.ndarray, labels: np.ndarray, num_examples: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first `num_examples` images in file order, unaugmented, in Madry's batches (the
    last one may be smaller)."""
    if num_examples > len(images):
        raise DataError(f"num_eval_examples {num_examples} exceeds the {len(images)} test "
                        f"images")
    for start in range(0, num_examples, batch_size):
        end = min(start + batch_size, num_examples)
        yield images[start:end].astype(np.float32), labels[start:end]
