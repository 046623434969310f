"""The dataset registry and the datasets beyond CIFAR-10's pickles: (Fashion-)MNIST IDX files
and Keras' caches, CIFAR-100 pickles, tensorflow_datasets by name and CIFAR-10's canonical
order there, and augmentation and attack files for any image shape. Every file is written
here, small, so neither the tests nor CI need the real data."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from madry_ns import attack_file, config as config_lib, data, idx
from madry_ns.errors import AttackFileError, ConfigError, DataError

CIFAR100_FINE = [f"class_{i:02d}".encode() for i in range(100)]


# ----------------------------------------------------------------------------------------
# IDX files written from the format description


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: magic number (type 0x08, ndim), big-endian sizes, then the bytes."""
    if magic is None:
        magic = 0x0800 | array.ndim
    return (struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            + array.astype(np.uint8).tobytes())


def write_idx_folder(folder, n_train=7, n_test=5, seed=0, gz=(True, False, True, False),
                     size=(28, 28)):
    """The four (Fashion-)MNIST files in `folder`, gzipped where `gz` says (per file, in
    idx.FILE_NAMES order), named with `.gz` when gzipped. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n_train, *size), np.uint8),
              "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, *size), np.uint8),
              "test_labels": rng.integers(0, 10, n_test).astype(np.uint8)}
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    for name, key, zipped in zip(idx.FILE_NAMES, keys, gz):
        raw = idx_bytes(arrays[key])
        path = os.path.join(str(folder), name + (".gz" if zipped else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(raw) if zipped else raw)
    return arrays


def config_for(tmp_path, **values):
    return config_lib.from_dict({"model_dir": str(tmp_path / "model"), **values})


@pytest.fixture
def no_other_places(monkeypatch, tmp_path):
    """Only data_path is searched (not this machine's Debian copy or Keras cache)."""
    monkeypatch.setattr(idx, "LOCATIONS", {"fashion_mnist": (str(tmp_path / "debian"),),
                                           "mnist": (str(tmp_path / "mnist.npz"),)})


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_files_load_with_shapes_values_order_and_names(tmp_path, no_other_places, name):
    folder = tmp_path / "idx"
    written = write_idx_folder(folder)
    ds = data.load_dataset(config_for(tmp_path, dataset=name, data_path=str(folder)))
    assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train_images[..., 0], written["train_images"])
    np.testing.assert_array_equal(ds.test_images[..., 0], written["test_images"])
    np.testing.assert_array_equal(ds.train_labels, written["train_labels"])
    np.testing.assert_array_equal(ds.test_labels, written["test_labels"])
    assert ds.image_shape == (28, 28, 1) == data.spec(name).image_shape
    assert ds.num_classes == 10 == data.spec(name).num_classes
    assert str(folder) in ds.source
    if name == "fashion_mnist":
        assert ds.label_names[0] == "T-shirt/top" and ds.label_names[9] == "Ankle boot"
    else:
        assert ds.label_names == [str(i) for i in range(10)]


def test_gzip_is_recognised_by_content_under_either_name(tmp_path, no_other_places):
    folder = tmp_path / "idx"
    written = write_idx_folder(folder, gz=(False,) * 4)
    # A raw file named .gz and a gzipped one without the suffix are both read.
    os.rename(folder / "t10k-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte.gz")
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(gzip.compress(raw))
    ds = data.load_dataset(config_for(tmp_path, dataset="fashion_mnist", data_path=str(folder)))
    np.testing.assert_array_equal(ds.train_images[..., 0], written["train_images"])
    np.testing.assert_array_equal(ds.test_labels, written["test_labels"])


def _corrupt(folder, name, content: bytes, zipped=False):
    for old in (name, name + ".gz"):
        if os.path.exists(folder / old):
            os.remove(folder / old)
    path = folder / (name + (".gz" if zipped else ""))
    path.write_bytes(content)
    return str(path)


BAD_FILES = {
    "bad magic (labels magic in an images file)": (
        "train-images-idx3-ubyte", lambda: idx_bytes(np.zeros(7), 0x00000801),
        "bad magic number 0x00000801; expected 0x00000803"),
    "bad magic (not IDX)": ("t10k-labels-idx1-ubyte", lambda: b"PK\x03\x04rest",
                            "bad magic number 0x504b0304"),
    "too short for a header": ("t10k-labels-idx1-ubyte", lambda: b"\x00\x00",
                               "too short for an IDX header"),
    "truncated header": ("train-images-idx3-ubyte", lambda: idx_bytes(
        np.zeros((7, 28, 28)))[:10], "truncated header"),
    "truncated data": ("train-images-idx3-ubyte", lambda: idx_bytes(
        np.zeros((7, 28, 28)))[:-5], "truncated data"),
    "extra bytes": ("t10k-labels-idx1-ubyte", lambda: idx_bytes(np.zeros(5)) + b"\x00",
                    "1 bytes after the data"),
    "wrong dimensions": ("t10k-images-idx3-ubyte", lambda: idx_bytes(np.zeros((5, 27, 28))),
                         r"wrong dimensions \(5, 27, 28\); expected \(N, 28, 28\)"),
    "counts differ": ("train-labels-idx1-ubyte", lambda: idx_bytes(np.zeros(6)),
                      "holds 7 images but .*train-labels-idx1-ubyte.* holds 6 labels"),
    "label out of range": ("test-labels", None, "labels must be in 0..9, found 10"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_idx_files_are_refused_naming_the_file_and_nothing_is_written(
        tmp_path, no_other_places, case):
    folder = tmp_path / "idx"
    write_idx_folder(folder)
    name, content, expected = BAD_FILES[case]
    if content is None:  # labels written fine but out of range
        name, content = "t10k-labels-idx1-ubyte", lambda: idx_bytes(np.array([1, 2, 10, 0, 0]))
    path = _corrupt(folder, name, content())
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(folder))
    with pytest.raises(DataError, match=expected) as info:
        data.load_dataset(config_for(tmp_path, dataset="fashion_mnist", data_path=str(folder)))
    assert path in str(info.value)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(folder))) == before


def test_truncated_gzip_is_refused_naming_the_file(tmp_path, no_other_places):
    folder = tmp_path / "idx"
    write_idx_folder(folder)
    good = gzip.compress(idx_bytes(np.zeros((7, 28, 28))))
    path = _corrupt(folder, "train-images-idx3-ubyte", good[:len(good) // 2], zipped=True)
    with pytest.raises(DataError, match="gzip data is truncated or corrupted") as info:
        data.load_dataset(config_for(tmp_path, dataset="fashion_mnist", data_path=str(folder)))
    assert path in str(info.value)


def test_no_files_lists_every_place_looked_in_and_how_to_get_them(tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    write_idx_folder(partial)
    os.remove(partial / "t10k-images-idx3-ubyte.gz")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(idx, "LOCATIONS", {
        **idx.LOCATIONS, "fashion_mnist": (str(partial), "~/.keras/datasets/fashion-mnist")})
    with pytest.raises(DataError) as info:
        data.load_dataset(config_for(tmp_path, dataset="fashion_mnist",
                                     data_path=str(tmp_path / "absent")))
    message = str(info.value)
    assert str(tmp_path / "absent") + " (no such folder)" in message
    assert f"{partial} (lacks t10k-images-idx3-ubyte)" in message
    assert str(tmp_path / "home" / ".keras" / "datasets" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "keras.datasets.fashion_mnist.load_data()" in message

    with pytest.raises(DataError) as info:
        data.load_dataset(config_for(tmp_path, dataset="mnist",
                                     data_path=str(tmp_path / "absent")))
    message = str(info.value)
    assert str(tmp_path / "home" / ".keras" / "datasets" / "mnist.npz") in message
    assert "keras.datasets.mnist.load_data()" in message


def test_the_default_places_are_debian_then_keras():
    assert idx.LOCATIONS["fashion_mnist"] == ("/usr/share/datasets/fashion-mnist",
                                              "~/.keras/datasets/fashion-mnist")
    assert idx.LOCATIONS["mnist"] == ("~/.keras/datasets/mnist.npz",)


def test_data_path_that_is_a_file_is_an_error(tmp_path, no_other_places):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="exists but is not a directory"):
        data.load_dataset(config_for(tmp_path, dataset="mnist", data_path=str(a_file)))


def test_keras_cache_fallback_and_data_path_first(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(idx, "LOCATIONS", {
        **idx.LOCATIONS, "fashion_mnist": (str(tmp_path / "no_debian"),
                                           "~/.keras/datasets/fashion-mnist")})
    cached = write_idx_folder(home / ".keras" / "datasets" / "fashion-mnist", seed=1,
                              gz=(True,) * 4)
    absent = config_for(tmp_path, dataset="fashion_mnist", data_path=str(tmp_path / "absent"))
    ds = data.load_dataset(absent)
    np.testing.assert_array_equal(ds.test_images[..., 0], cached["test_images"])
    assert ".keras" in ds.source

    mine = write_idx_folder(tmp_path / "mine", n_train=3, seed=2)
    ds = data.load_dataset(absent.replace(data_path=str(tmp_path / "mine")))
    np.testing.assert_array_equal(ds.train_images[..., 0], mine["train_images"])

    # mnist: Keras' one archive, read without unpickling.
    rng = np.random.default_rng(3)
    arrays = {"x_train": rng.integers(0, 256, (6, 28, 28), np.uint8),
              "y_train": rng.integers(0, 10, 6), "x_test": rng.integers(0, 256, (4, 28, 28),
                                                                        np.uint8),
              "y_test": rng.integers(0, 10, 4)}
    np.savez(home / ".keras" / "datasets" / "mnist.npz", **arrays)
    ds = data.load_dataset(absent.replace(dataset="mnist"))
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.test_labels, arrays["y_test"])
    assert ds.test_images.shape == (4, 28, 28, 1) and ds.test_labels.dtype == np.int64

    np.savez(home / ".keras" / "datasets" / "mnist.npz",
             **{**arrays, "x_test": np.array([object()] * 4)})
    with pytest.raises(DataError, match="mnist.npz: not a readable .npz"):
        data.load_dataset(absent.replace(dataset="mnist"))


# ----------------------------------------------------------------------------------------
# CIFAR-100 pickles


def write_cifar100(folder, dump, protocol="py2", n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
        fine = rng.integers(0, 100, n)
        dump({b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
              b"fine_labels": [int(v) for v in fine],
              b"coarse_labels": [int(v) // 5 for v in fine],
              b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(n, 3072))},
             os.path.join(folder, split), protocol)
        out[split] = (x, fine)
    dump({b"fine_label_names": list(CIFAR100_FINE),
          b"coarse_label_names": [b"c"] * 20}, os.path.join(folder, "meta"), protocol)
    return out


@pytest.mark.parametrize("protocol", ["py2", 2, 4])
def test_cifar100_pickles_load_with_fine_labels(tmp_path, write_pickle, protocol):
    written = write_cifar100(tmp_path / "c100", write_pickle, protocol)
    ds = data.load_dataset(config_for(tmp_path, dataset="cifar100",
                                      data_path=str(tmp_path / "c100")))
    np.testing.assert_array_equal(ds.train_images, written["train"][0])
    np.testing.assert_array_equal(ds.test_images, written["test"][0])
    np.testing.assert_array_equal(ds.test_labels, written["test"][1])
    assert ds.train_labels.dtype == np.int64 and ds.num_classes == 100
    assert ds.label_names[:2] == ["class_00", "class_01"]
    assert ds.image_shape == (32, 32, 3) == data.spec("cifar100").image_shape


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_cifar100_refuses_a_hostile_pickle(tmp_path, write_pickle):
    write_cifar100(tmp_path / "c100", write_pickle)
    marker = tmp_path / "pwned"
    write_pickle({b"data": _Payload(os.mkdir, str(marker)), b"fine_labels": [1]},
                 tmp_path / "c100" / "train", 2)
    with pytest.raises(DataError, match="refusing to unpickle 'posix.mkdir'") as info:
        data.load_dataset(config_for(tmp_path, dataset="cifar100",
                                     data_path=str(tmp_path / "c100")))
    assert str(tmp_path / "c100" / "train") in str(info.value)
    assert not marker.exists()


def test_cifar100_bad_files_name_the_file(tmp_path, write_pickle):
    written_to = tmp_path / "c100"
    write_cifar100(written_to, write_pickle)
    write_pickle({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 100]},
                 written_to / "test", 2)
    with pytest.raises(DataError, match=r"test: labels must be in 0..99"):
        data.load_dataset(config_for(tmp_path, dataset="cifar100", data_path=str(written_to)))
    os.remove(written_to / "test")
    with pytest.raises(DataError, match="test: file not found. CIFAR-100's layout"):
        data.load_dataset(config_for(tmp_path, dataset="cifar100", data_path=str(written_to)))
    with pytest.raises(DataError, match="is not a folder. CIFAR-100's layout"):
        data.load_dataset(config_for(tmp_path, dataset="cifar100",
                                     data_path=str(tmp_path / "absent")))


# ----------------------------------------------------------------------------------------
# tensorflow_datasets


def test_tfds_cifar10_is_in_the_files_order_not_tfds_storage_order(mock_tfds_cifar10,
                                                                  tmp_path):
    mock = mock_tfds_cifar10(num_examples=20, seed=4)
    assert not np.array_equal(mock.storage["test"], np.arange(20))  # tfds' order is shuffled
    with mock:
        fallback = data.load_dataset(config_for(tmp_path, dataset="cifar10",
                                                data_path=str(tmp_path / "absent")))
        by_name = data.load_dataset(config_for(tmp_path, dataset="tfds:cifar10"))
    for ds in (fallback, by_name):
        for split in ("train", "test"):
            np.testing.assert_array_equal(getattr(ds, f"{split}_images"), mock.images[split])
            np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), mock.labels[split])
    assert fallback.source == "tensorflow_datasets cifar10"
    assert fallback.label_names[0] == "airplane"


def test_tfds_cifar10_without_index_ids_is_refused():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):  # tfds' mock: ids are random strings
        with pytest.raises(DataError, match="no 'id' feature numbering them"):
            data.load_tfds_cifar10()


def test_any_tfds_dataset_by_name_keeps_grayscale_one_channel(tmp_path):
    import tensorflow_datasets as tfds

    config = config_for(tmp_path, dataset="tfds:fashion_mnist")
    assert data.image_shape(config) == (28, 28, 1) and data.num_classes(config) == 10
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset(config)
    assert ds.train_images.shape == (6, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.dtype == np.int64 and ds.image_shape == (28, 28, 1)
    assert ds.label_names[0] == "T-shirt/top" and ds.source == "tensorflow_datasets fashion_mnist"


def test_tfds_dataset_not_prepared_fails_fast_saying_how_to_download(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        data.load_tfds("svhn_cropped", data_dir=str(empty))
    message = str(info.value)
    assert "svhn_cropped" in message and str(empty) in message
    assert '"tfds_download": true' in message and "download_and_prepare" in message
    assert os.listdir(empty) == []


def test_tfds_unknown_or_unsuitable_names(tmp_path):
    with pytest.raises(DataError, match="has no dataset 'no_such_set_xyz'"):
        data.image_shape(config_for(tmp_path, dataset="tfds:no_such_set_xyz"))
    with pytest.raises(DataError, match="only image-classification datasets"):
        data.image_shape(config_for(tmp_path, dataset="tfds:glue/cola"))


# ----------------------------------------------------------------------------------------
# The registry and the config


def test_registry_rejects_an_unknown_name_naming_the_known_ones(tmp_path):
    with pytest.raises(DataError) as info:
        data.spec("svhn")
    for name in ("'cifar10'", "'cifar100'", "'mnist'", "'fashion_mnist'", "'digits'",
                 "'tfds:<name>'"):
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="key 'dataset' has value \"svhn\", expected one of "
                                          "'cifar10', 'cifar100', 'mnist', 'fashion_mnist'"):
        config_for(tmp_path, dataset="svhn")
    with pytest.raises(ConfigError, match="'tfds:' followed by"):
        config_for(tmp_path, dataset="tfds:")
    config_for(tmp_path, dataset="tfds:svhn_cropped")
    config_for(tmp_path, dataset="tfds:cifar10:3.0.2", tfds_download=True)


def test_a_registered_dataset_is_one_entry(tmp_path):
    toy = data.DatasetSpec("toy_set", lambda config: data.Dataset(
        np.zeros((4, 5, 6, 2), np.uint8), np.zeros(4, np.int64), np.zeros((2, 5, 6, 2), np.uint8),
        np.zeros(2, np.int64), ["a", "b", "c"], source="toy"), (5, 6, 2), 3, "a toy")
    data.register(toy)
    try:
        config = config_for(tmp_path, dataset="toy_set")
        assert data.load_dataset(config).image_shape == data.image_shape(config) == (5, 6, 2)
        assert data.num_classes(config) == 3
        with pytest.raises(ValueError, match="taken"):
            data.register(toy)
    finally:
        del data.REGISTRY["toy_set"]


def test_every_registered_loader_matches_its_spec(tmp_path, madry_pickles, write_pickle,
                                                  no_other_places):
    folder = tmp_path / "idx"
    write_idx_folder(folder)
    write_cifar100(tmp_path / "c100", write_pickle)
    paths = {"cifar10": madry_pickles(tmp_path, 2, 2)["data_path"], "mnist": str(folder),
             "fashion_mnist": str(folder), "cifar100": str(tmp_path / "c100"),
             "digits": str(tmp_path / "absent")}
    assert set(paths) == set(data.REGISTRY)
    for name, path in paths.items():
        ds = data.load_dataset(config_for(tmp_path, dataset=name, data_path=path))
        assert ds.image_shape == data.spec(name).image_shape, name
        assert ds.num_classes == data.spec(name).num_classes, name
        assert ds.test_images.shape[1:] == ds.image_shape, name


# ----------------------------------------------------------------------------------------
# Any image shape: augmentation, pipeline, attack files


# sha256 prefixes of augment_batch's output on CIFAR-10-shaped input before it took any shape.
CIFAR10_AUGMENT_SHA = {"madry": "3ffe3390e0bc3e94", "crop": "e8d8bc362b416f5e",
                       "pad4_flip": "54f3ef2a96912c5d", "none": "a042baf7c7e374f1"}


@pytest.mark.parametrize("mode", data.AUGMENTATIONS)
def test_cifar10_augmentation_is_bit_for_bit_unchanged(mode):
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3))
                    .astype(np.float32))
    out = data.augment_batch(x, tf.constant([11, 5], tf.int64), mode).numpy()
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == CIFAR10_AUGMENT_SHA[mode]


@pytest.mark.parametrize("mode", ["madry", "crop", "pad4_flip"])
def test_augmentation_on_28x28x1_is_a_stateless_crop_of_the_padded_image(mode):
    import tensorflow as tf

    rng = np.random.default_rng(5)
    images = rng.integers(1, 256, (64, 28, 28, 1)).astype(np.float32)
    seed = tf.constant([2, 9], tf.int64)
    out = data.augment_batch(tf.constant(images), seed, mode).numpy()
    again = data.augment_batch(tf.constant(images), seed, mode).numpy()
    other = data.augment_batch(tf.constant(images), tf.constant([2, 10], tf.int64), mode)
    assert out.shape == images.shape
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other.numpy())
    pad = 4 if mode == "pad4_flip" else 2
    flips = 0
    for aug, image in zip(out, images):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        found = [(r, c, f) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                 for f in (False, True)
                 if np.array_equal(aug, padded[r:r + 28, c:c + 28][:, ::-1] if f
                                   else padded[r:r + 28, c:c + 28])]
        assert len(found) == 1, found
        flips += found[0][2]
    assert (flips == 0) if mode == "crop" else (10 < flips < 54)


def test_pipeline_and_eval_batches_on_28x28x1():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28, 1), np.uint8)
    labels = np.arange(20) % 10
    pipe = data.train_pipeline(images, labels, 4, order_seed=1, augment_seed=2)
    for step, x, y in pipe.take(3).as_numpy_iterator():
        assert x.shape == (4, 28, 28, 1) and x.dtype == np.float32 and y.shape == (4,)
    batches = list(data.eval_batches(images, labels, 10, 4))
    assert [b[0].shape for b in batches] == [(4, 28, 28, 1), (4, 28, 28, 1), (2, 28, 28, 1)]


def test_attack_file_shape_follows_the_dataset():
    x = np.zeros((3, 28, 28, 1))
    attack_file.check_array(x, 3, (28, 28, 1))
    assert attack_file.validate(x, np.zeros((3, 28, 28, 1), np.uint8), 0.3) == 0.0
    with pytest.raises(AttackFileError) as info:
        attack_file.check_array(x, 3)  # CIFAR-10's shape by default, Madry's words
    assert str(info.value) == "Invalid shape: expected (3, 32, 32, 3), found (3, 28, 28, 1)"
    assert attack_file.expected_shape(10000) == (10000, 32, 32, 3)


@pytest.mark.slow
def test_a_fashion_mnist_config_trains_from_the_keras_cache_alone(tmp_path, monkeypatch):
    """configs/fashion_mnist/madry_pgd.json (shortened) trains on a machine with neither
    data_path nor Debian's package, only keras.datasets' cache folder: tiny IDX files there."""
    from madry_ns import checkpoints, training

    cache = tmp_path / "home" / ".keras" / "datasets" / "fashion-mnist"
    write_idx_folder(cache, n_train=16, n_test=8, gz=(True,) * 4)
    monkeypatch.setattr(idx, "LOCATIONS", {**idx.LOCATIONS, "fashion_mnist": (
        str(tmp_path / "no-debian-package"), "~/.keras/datasets/fashion-mnist")})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "fashion_mnist",
                        "madry_pgd.json")
    config = config_lib.load(path).replace(
        model_dir=str(tmp_path / "model"), data_path=str(tmp_path / "no-data-path"),
        training_batch_size=8, max_num_training_steps=1, num_steps=1, num_eval_examples=8,
        eval_batch_size=8)
    assert (config.dataset, config.model, config.epsilon) == ("fashion_mnist", "resnet20", 25.5)
    final = training.train(config, out=lambda *_: None)
    assert checkpoints.checkpoint_step(final) == 1
