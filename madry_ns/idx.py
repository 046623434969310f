"""The IDX files of MNIST and Fashion-MNIST: a reader written from the format's description,
and the places the files are looked for.

An IDX file is a 4-byte magic number, then one 4-byte big-endian size per dimension, then the
values in row-major order. The magic number's first two bytes are zero, the third gives the
value type (0x08: unsigned byte, the only type MNIST uses) and the fourth the number of
dimensions: 0x00000803 for images (N, rows, columns), 0x00000801 for labels (N,). The files
are distributed gzipped (`train-images-idx3-ubyte.gz`, ...); a gzipped file is recognised by
its content, so either form is read under either name.

Every problem is a `DataError` naming the file and what is wrong; nothing here writes files.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from madry_ns.errors import DataError

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
# (images, labels) file names of each split, as Yann LeCun's page and Zalando publish them.
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILE_NAMES = tuple(name for pair in SPLIT_FILES.values() for name in pair)

# Where each dataset is looked for after `data_path`, in order: folders holding the four IDX
# files, or Keras' `.npz` archive (x_train, y_train, x_test, y_test). `~` is expanded when
# searching, so a test can redirect HOME; tests may also replace these tuples.
LOCATIONS = {
    # Debian's package dataset-fashion-mnist; keras.datasets.fashion_mnist's download cache.
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist", "~/.keras/datasets/fashion-mnist"),
    # Debian has no MNIST package; keras.datasets.mnist caches one archive.
    "mnist": ("~/.keras/datasets/mnist.npz",),
}
HOW_TO_GET = {
    "fashion_mnist": (
        "offline on Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs the files "
        "in /usr/share/datasets/fashion-mnist); online: `python -c \"import keras; "
        "keras.datasets.fashion_mnist.load_data()\"` (fills ~/.keras/datasets/fashion-mnist), or "
        "download the four .gz files from https://github.com/zalandoresearch/fashion-mnist "
        "into a folder and set data_path to it"),
    "mnist": (
        "online: `python -c \"import keras; keras.datasets.mnist.load_data()\"` (writes "
        "~/.keras/datasets/mnist.npz), or put the four IDX files (from a mirror of Yann "
        "LeCun's MNIST page, e.g. https://ossci-datasets.s3.amazonaws.com/mnist/) in a "
        "folder and set data_path to it; offline, copy either from a machine that has them"),
}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: gzip data is truncated or corrupted ({type(e).__name__}: "
                        f"{e})") from None


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not) whose magic number must be `magic`."""
    raw = _read_bytes(path)
    kinds = {IMAGES_MAGIC: "images (0x00000803: unsigned bytes, 3 dimensions)",
             LABELS_MAGIC: "labels (0x00000801: unsigned bytes, 1 dimension)"}
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (expected "
                        f"an IDX file of {kinds[magic]})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}; expected 0x{magic:08x}, an "
                        f"IDX file of {kinds[magic]}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header: {len(raw)} bytes, the {ndim} dimension "
                        f"sizes need {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(f"{path}: truncated data: dimensions {dims} need {expected} bytes, "
                        f"the file holds {len(raw)}")
    if len(raw) > expected:
        raise DataError(f"{path}: {len(raw) - expected} bytes after the data of dimensions "
                        f"{dims}; the file is corrupted or not one IDX array")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def check_pair(images: np.ndarray, labels: np.ndarray, image_size: tuple, num_classes: int,
               images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) -> uint8 (N, H, W, 1) and int64, or a DataError."""
    if images.ndim != 3 or images.shape[1:] != tuple(image_size):
        raise DataError(f"{images_name}: wrong dimensions {images.shape}; expected (N, "
                        f"{image_size[0]}, {image_size[1]}) images")
    if labels.ndim != 1:
        raise DataError(f"{labels_name}: wrong dimensions {labels.shape}; expected (N,)")
    if len(images) != len(labels):
        raise DataError(f"{images_name} holds {len(images)} images but {labels_name} holds "
                        f"{len(labels)} labels; the counts must be equal")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{labels_name}: labels must be in 0..{num_classes - 1}, found "
                        f"{int(labels.max())}")
    return images[..., None].astype(np.uint8), labels.astype(np.int64)


def _find(folder: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_folder(folder: str, image_size: tuple, num_classes: int) -> dict:
    """{'train': (images, labels), 'test': ...} from the four IDX files in `folder`."""
    out = {}
    for split, (images_name, labels_name) in SPLIT_FILES.items():
        images_path, labels_path = _find(folder, images_name), _find(folder, labels_name)
        out[split] = check_pair(read_idx(images_path, IMAGES_MAGIC),
                                read_idx(labels_path, LABELS_MAGIC), image_size, num_classes,
                                images_path, labels_path)
    return out


def read_keras_npz(path: str, image_size: tuple, num_classes: int) -> dict:
    """The same from Keras' archive (`mnist.npz`: x_train, y_train, x_test, y_test)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as e:
        raise DataError(f"{path}: missing array {e}; expected Keras' x_train, y_train, "
                        f"x_test, y_test") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz archive of numeric arrays "
                        f"({type(e).__name__}: {e})") from None
    out = {}
    for split in ("train", "test"):
        x, y = arrays["x_" + split], arrays["y_" + split]
        if x.dtype != np.uint8 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: x_{split} must be uint8 and y_{split} integer, found "
                            f"{x.dtype} and {y.dtype}")
        out[split] = check_pair(x, y, image_size, num_classes, f"{path} (x_{split})",
                                f"{path} (y_{split})")
    return out


def load(name: str, data_path: str, image_size: tuple = (28, 28),
         num_classes: int = 10) -> tuple[dict, str]:
    """The splits of `name` from the first place that has all its files, and that place:
    `data_path` if it is a folder, then `LOCATIONS[name]`. No place: a DataError listing
    every place looked in and how to get the files."""
    if os.path.exists(data_path) and not os.path.isdir(data_path):
        raise DataError(f"data_path '{data_path}' exists but is not a directory; expected a "
                        f"folder with the IDX files {', '.join(FILE_NAMES)} (.gz or not)")
    places = [data_path] + [os.path.expanduser(p) for p in LOCATIONS[name]]
    looked = []
    for place in places:
        if place.endswith(".npz"):
            if os.path.isfile(place):
                return read_keras_npz(place, image_size, num_classes), place
            looked.append(f"{place} (not found)")
            continue
        if not os.path.isdir(place):
            looked.append(f"{place} (no such folder)")
            continue
        missing = [n for n in FILE_NAMES if _find(place, n) is None]
        if not missing:
            return read_folder(place, image_size, num_classes), place
        looked.append(f"{place} (lacks {', '.join(missing)})")
    raise DataError(f"{name}: no copy of its IDX files ({', '.join(FILE_NAMES)}, each .gz or "
                    f"not) found. Looked in: " + "; ".join(looked) + ". To get them, "
                    + HOW_TO_GET[name] + ".")
