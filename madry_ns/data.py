"""Datasets and input pipelines.

A dataset is one entry of `REGISTRY` (name -> `DatasetSpec`: a loader from the config, the
image shape and class count); `config.dataset` names one. Every loader gives uint8 NHWC images
on 0-255 and int64 labels in the original file order:

* `cifar10`: Madry's on-disk python pickles at `data_path` (`data_batch_1..5`, `test_batch`,
  `batches.meta`), read with a restricted unpickler that admits only the types those files
  contain, so a hostile pickle cannot run code; when `data_path` does not exist,
  `tensorflow_datasets`' `cifar10` (never downloaded implicitly: offline, it fails at once with
  instructions), put back in the files' order by its `id` feature ("test_00042" is image 42 of
  `test_batch`), where tfds stores it hash-shuffled;
* `cifar100`: the python pickles `train`, `test`, `meta` at `data_path` (fine labels), through
  the same unpickler;
* `mnist`, `fashion_mnist`: the IDX files in `data_path`, Debian's
  /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`), or Keras'
  download cache (`madry_ns.idx`), 28x28x1;
* `tfds:<name>`: any image-classification dataset of tensorflow_datasets (splits 'train' and
  'test', its supervised keys), downloaded only when `tfds_download` is true; in its `id`
  order when it has one, else in tfds' storage order;
* `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, offline),
  scaled from 0-16 to 0-255, enlarged 4x by pixel repetition and copied to three channels;
  test = the 300 images at `np.random.default_rng(0).permutation(1797)[:300]`, train = the
  other 1,497.

The training pipeline is Madry's: fixed batches, a fresh shuffle each pass with the tail
dropped, and per-image augmentation (for H x W images: zero-pad by 2, random H x W crop, random
horizontal flip). It is stateless: the order of pass e is a function of (seed, e) and the
augmentation of step s a function of (seed, s), so resuming at step s needs nothing but s.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from typing import Callable, Iterator

import numpy as np

from madry_ns import idx
from madry_ns.errors import DataError

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                        "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS_TEST_SIZE = 300
AUGMENTATIONS = ("madry", "crop", "pad4_flip", "none")
TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images uint8 (N, H, W, C) on 0-255, labels int64 (N,) in 0..num_classes-1."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list
    source: str

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: `load(config) -> Dataset`, and what a model needs to know
    before the data is loaded (the loaded arrays have this image shape and class count)."""

    name: str
    load: Callable
    image_shape: tuple
    num_classes: int
    doc: str


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset under `spec.name` (a config can then name it)."""
    if spec.name in REGISTRY or spec.name.startswith(TFDS_PREFIX):
        raise ValueError(f"dataset name '{spec.name}' is taken")
    REGISTRY[spec.name] = spec
    return spec


def names() -> tuple:
    """Every value `config.dataset` accepts, `tfds:<name>` standing for the tfds ones."""
    return tuple(REGISTRY) + (TFDS_PREFIX + "<name>",)


def name_error(name) -> str | None:
    """Why `name` is not a dataset a config can name, or None (no TensorFlow import)."""
    if name in REGISTRY:
        return None
    if isinstance(name, str) and name.startswith(TFDS_PREFIX):
        if re.fullmatch(r"[a-z0-9_]+(/[\w.-]+)?(:[\d.*]+)?", name[len(TFDS_PREFIX):]):
            return None
        return (f"'{TFDS_PREFIX}' followed by a tensorflow_datasets name such as "
                f"'{TFDS_PREFIX}svhn_cropped'")
    return "one of " + ", ".join(repr(n) for n in names())


def spec(name: str) -> DatasetSpec:
    """The registry entry of `name`; for `tfds:<name>`, built from tfds' metadata."""
    problem = name_error(name)
    if problem:
        raise DataError(f"unknown dataset {name!r}; expected {problem}")
    if name in REGISTRY:
        return REGISTRY[name]
    info = _tfds_info(name[len(TFDS_PREFIX):])
    image_key, label_key = _tfds_keys(name, info)
    return DatasetSpec(name, lambda config: load_tfds(name[len(TFDS_PREFIX):],
                                                      download=config.tfds_download),
                       tuple(info.features[image_key].shape),
                       info.features[label_key].num_classes, "tensorflow_datasets")


def load_dataset(config) -> Dataset:
    """The dataset a config names (`dataset`, `data_path`, `tfds_download`)."""
    return spec(config.dataset).load(config)


def image_shape(config) -> tuple:
    """(H, W, C) of the config's dataset, without loading it."""
    return spec(config.dataset).image_shape


def num_classes(config) -> int:
    """The class count of the config's dataset, without loading it."""
    return spec(config.dataset).num_classes


# ---------------------------------------------------------------------------------------
# CIFAR python pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's and CIFAR-100's python batches contain: dicts, lists,
    bytes, numbers and numpy arrays. Any other global (os.system, builtins.eval, ...) is
    refused before it can be called."""

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
                f"{self.filename}: refusing to unpickle '{module}.{name}'. A CIFAR batch "
                f"holds only a dict of bytes, lists and a uint8 array; this file asks for "
                f"something else (possibly code to execute), so it was not loaded.")
        return allowed[(module, name)]


def safe_unpickle(path: str, layout: str = "Madry's data layout is data_batch_1..5, "
                  "test_batch and batches.meta in data_path."):
    """Load a pickle that may only contain CIFAR batch types (see the unpickler). `layout`
    is said when the file is missing."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found. {layout}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled: pickle raises many types
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}); "
                        f"the file may be truncated or corrupted.") from None


def _read_batch(path: str, label_key: bytes = b"labels", num_classes: int = 10,
                layout: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path, *([layout] if layout else []))
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DataError(f"{path}: expected a dict with keys b'data' and {label_key!r} "
                        f"(CIFAR python format), found {type(d).__name__}"
                        + (f" with keys {sorted(d)[:6]}" if isinstance(d, dict) else ""))
    x, labels = d[b"data"], d[label_key]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
            or x.shape[1] != 3072:
        desc = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
                else type(x).__name__)
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), "
                        f"found {desc}")
    y = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else np.zeros(0)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise DataError(f"{path}: {label_key!r} must be a list of {len(x)} integers, one per "
                        f"image; found {type(labels).__name__} "
                        f"{getattr(y, 'dtype', '')} of length {len(y)}")
    if len(y) and (y.min() < 0 or y.max() > num_classes - 1):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found values in "
                        f"[{y.min()}, {y.max()}]")
    # Channel-major rows (1024 R, 1024 G, 1024 B) -> NHWC, as Madry's loader.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def _label_names(path: str, key: bytes, count: int) -> list:
    meta = safe_unpickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != count or \
            not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{path}: expected a dict with {key!r}, a list of {count} byte "
                        f"strings")
    return [n.decode("utf-8") for n in names]


def load_madry_pickles(data_path: str) -> Dataset:
    """CIFAR-10 from Madry's `data_path` layout (any number of images per batch)."""
    train = [_read_batch(os.path.join(data_path, f)) for f in TRAIN_FILES]
    test_x, test_y = _read_batch(os.path.join(data_path, TEST_FILE))
    names = _label_names(os.path.join(data_path, META_FILE), b"label_names", 10)
    return Dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_x, test_y, names, source=f"CIFAR-10 pickles in {data_path}")


def load_cifar10(config) -> Dataset:
    """Madry's pickles at `data_path`, else tensorflow_datasets' prepared copy."""
    if os.path.isdir(config.data_path):
        return load_madry_pickles(config.data_path)
    if os.path.exists(config.data_path):
        raise DataError(f"data_path '{config.data_path}' exists but is not a directory; "
                        f"expected a folder with CIFAR-10 python pickles")
    return load_tfds_cifar10(download=config.tfds_download)


def load_cifar100(config) -> Dataset:
    """CIFAR-100's python pickles (`train`, `test`, `meta`, from cifar-100-python.tar.gz) in
    `data_path`, with the 100 fine labels (the coarse ones are not used)."""
    layout = (f"CIFAR-100's layout is {', '.join(CIFAR100_FILES)} in data_path (extract "
              f"cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
              f"set data_path to its cifar-100-python folder).")
    if not os.path.isdir(config.data_path):
        raise DataError(f"data_path '{config.data_path}' is not a folder. {layout}")
    path = config.data_path
    train_x, train_y = _read_batch(os.path.join(path, "train"), b"fine_labels", 100, layout)
    test_x, test_y = _read_batch(os.path.join(path, "test"), b"fine_labels", 100, layout)
    names = _label_names(os.path.join(path, "meta"), b"fine_label_names", 100)
    return Dataset(train_x, train_y, test_x, test_y, names,
                   source=f"CIFAR-100 pickles in {path}")


# ---------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)


def _idx_loader(name: str, label_names: list):
    def load(config) -> Dataset:
        splits, place = idx.load(name, config.data_path)
        (tx, ty), (vx, vy) = splits["train"], splits["test"]
        return Dataset(tx, ty, vx, vy, list(label_names), source=f"{name} in {place}")
    load.__doc__ = f"{name} from its IDX files (`madry_ns.idx.load`)."
    return load


# ---------------------------------------------------------------------------------------
# tensorflow_datasets


def _tfds_info(name: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name).info
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        raise DataError(f"tensorflow_datasets has no dataset '{name}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); see "
                        f"https://www.tensorflow.org/datasets/catalog") from None


def _tfds_keys(name: str, info) -> tuple[str, str]:
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str)
                                                               for k in keys)):
        raise DataError(f"{name}: tensorflow_datasets gives no (image, label) supervised keys "
                        f"for it; only image-classification datasets can be used")
    image_key, label_key = keys
    shape = tuple(info.features[image_key].shape)
    if len(shape) != 3 or None in shape:
        raise DataError(f"{name}: its '{image_key}' feature has shape {shape}; expected images "
                        f"of one fixed size (H, W, C)")
    if not hasattr(info.features[label_key], "num_classes"):
        raise DataError(f"{name}: its '{label_key}' feature is not a class label")
    return image_key, label_key


_ID_INDEX = re.compile(rb"^[A-Za-z]*_?(\d+)$")


def _id_order(ids: np.ndarray) -> np.ndarray | None:
    """The permutation sorting examples by the index in their `id` ("test_00042" -> 42), or
    None when the ids are not the indices 0..N-1."""
    matches = [_ID_INDEX.match(bytes(i)) for i in ids]
    if not all(matches):
        return None
    index = np.array([int(m.group(1)) for m in matches], np.int64)
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        return None
    return np.argsort(index, kind="stable")


def _tfds_split(tfds, split, image_key: str, label_key: str, name: str, split_name: str,
                require_ids: bool) -> tuple[np.ndarray, np.ndarray]:
    images, labels, ids = [], [], []
    # Batched by hand: batch_size=-1 sizes one batch from the dataset's metadata and, where
    # that is missing (tfds.testing.mock_data), asks for sys.maxsize and aborts the process.
    for example in tfds.as_numpy(split.batch(10000)):
        images.append(example[image_key])
        labels.append(example[label_key])
        if "id" in example:
            ids.append(example["id"])
    x, y = np.concatenate(images), np.concatenate(labels)
    order = _id_order(np.concatenate(ids)) if ids else None
    if order is None and require_ids:
        raise DataError(f"tensorflow_datasets {name} '{split_name}': its examples carry no "
                        f"'id' feature numbering them 0..{len(x) - 1} (as 'test_00042'), so "
                        f"the files' order cannot be restored; use Madry's pickles in "
                        f"data_path")
    if order is not None:
        x, y = x[order], y[order]
    if x.dtype != np.uint8:
        raise DataError(f"tensorflow_datasets {name}: images are {x.dtype}, expected uint8")
    return x, y.astype(np.int64)


def _tfds_load(name: str, data_dir: str | None, download: bool, not_found: str):
    import tensorflow_datasets as tfds

    try:
        return tfds, tfds.load(name, split=["train", "test"], download=download,
                               data_dir=data_dir, with_info=True)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) \
            as e:
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise DataError(not_found.format(where=where, error=type(e).__name__)) from None


def load_tfds_cifar10(data_dir: str | None = None, download: bool = False) -> Dataset:
    """CIFAR-10 prepared by tensorflow_datasets, both splits in the files' order (by the
    `id` feature: tfds stores them hash-shuffled). Downloads only if `download`."""
    tfds, (splits, info) = _tfds_load("cifar10", data_dir, download, (
        "CIFAR-10 not found: data_path does not exist and tensorflow_datasets has no "
        "prepared 'cifar10' in {where} ({error}). Either put Madry's pickles "
        "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "extracted: data_batch_1..5, test_batch, batches.meta) in data_path, or, on a "
        "machine with network access, set \"tfds_download\": true or run: python -c "
        "\"import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare()"
        "\". For an offline demo use \"dataset\": \"digits\"."))
    (tx, ty), (vx, vy) = [_tfds_split(tfds, s, "image", "label", "cifar10", n, True)
                          for s, n in zip(splits, ("train", "test"))]
    return Dataset(tx, ty, vx, vy, list(CIFAR10_LABELS), source="tensorflow_datasets cifar10")


def load_tfds(name: str, data_dir: str | None = None, download: bool = False) -> Dataset:
    """Any image-classification dataset of tensorflow_datasets ('train' and 'test' splits, its
    supervised keys, grayscale kept at 1 channel). In `id` order where the examples are
    numbered that way, else in tfds' storage order. Downloads only if `download`."""
    _tfds_keys(name, _tfds_info(name))
    tfds, (splits, info) = _tfds_load(name, data_dir, download, (
        f"tensorflow_datasets has no prepared '{name}' in {{where}} ({{error}}) with splits "
        f"'train' and 'test'. On a machine with network access set \"tfds_download\": true, "
        f"or run: python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}')"
        f".download_and_prepare()\"; offline, copy a prepared {{where}}/{name} from such a "
        f"machine."))
    image_key, label_key = _tfds_keys(name, info)
    (tx, ty), (vx, vy) = [_tfds_split(tfds, s, image_key, label_key, name, n, False)
                          for s, n in zip(splits, ("train", "test"))]
    return Dataset(tx, ty, vx, vy, list(info.features[label_key].names),
                   source=f"tensorflow_datasets {name}")


# ---------------------------------------------------------------------------------------
# digits


def load_digits(config=None) -> Dataset:
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


register(DatasetSpec("cifar10", load_cifar10, (32, 32, 3), 10,
                     "Madry's pickles in data_path, else tensorflow_datasets' cifar10"))
register(DatasetSpec("cifar100", load_cifar100, (32, 32, 3), 100,
                     "CIFAR-100's python pickles train, test, meta in data_path"))
register(DatasetSpec("mnist", _idx_loader("mnist", [str(i) for i in range(10)]),
                     (28, 28, 1), 10, "IDX files in data_path, else ~/.keras/datasets/mnist.npz"))
register(DatasetSpec("fashion_mnist", _idx_loader("fashion_mnist", FASHION_MNIST_LABELS),
                     (28, 28, 1), 10, "IDX files in data_path, /usr/share/datasets/fashion-mnist "
                     "or ~/.keras/datasets/fashion-mnist"))
register(DatasetSpec("digits", load_digits, (32, 32, 3), 10,
                     "scikit-learn's bundled handwritten digits as 32x32x3, offline"))


# ---------------------------------------------------------------------------------------
# Pipelines


def augment_batch(images, seed, mode: str = "madry"):
    """Madry's per-image augmentation on a float (B, H, W, C) batch, stateless in `seed`.

    Zero-pad by 2 on each side, crop a random H x W window (offsets 0..4), and ('madry') flip
    left-right with probability 1/2 ('crop': no flip). 'pad4_flip' is PyTorch's
    RandomCrop(size, padding=4) and RandomHorizontalFlip: pad by 4, offsets 0..8, flip. The
    crop and flip are one gather per axis; the output has the input's shape.
    """
    import tensorflow as tf

    if mode == "none":
        return images
    b = tf.shape(images)[0]
    # Static sizes where known (always in the pipeline), so the output shape is static too.
    h = images.shape[1] if images.shape[1] is not None else tf.shape(images)[1]
    w = images.shape[2] if images.shape[2] is not None else tf.shape(images)[2]
    pad = 4 if mode == "pad4_flip" else 2
    offsets = 2 * pad + 1
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    # One draw in [0, 2 * offsets): mod `offsets` gives the offsets, mod 2 the flip, all
    # uniform (for Madry's 5 offsets the draw is in [0, 10), as before).
    draw = tf.random.stateless_uniform([b, 3], seed=seed, minval=0, maxval=2 * offsets,
                                       dtype=tf.int32)
    rows = draw[:, 0:1] % offsets + tf.range(h)
    cols = draw[:, 1:2] % offsets + tf.range(w)
    if mode in ("madry", "pad4_flip"):
        flip = tf.equal(draw[:, 2:3] % 2, 1)
        cols = tf.where(flip, draw[:, 1:2] % offsets + (w - 1) - tf.range(w), cols)
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


def check_num_examples(num_examples: int, available: int) -> None:
    """A DataError when the first `num_examples` test images are more than there are."""
    if num_examples > available:
        raise DataError(f"num_eval_examples {num_examples} exceeds the {available} test "
                        f"images")


def eval_batches(images: np.ndarray, labels: np.ndarray, num_examples: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first `num_examples` images in file order, unaugmented, in Madry's batches (the
    last one may be smaller)."""
    check_num_examples(num_examples, len(images))
    for start in range(0, num_examples, batch_size):
        end = min(start + batch_size, num_examples)
        yield images[start:end].astype(np.float32), labels[start:end]
