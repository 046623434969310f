"""Data: Madry's pickles (and hostile ones), tensorflow_datasets offline, digits, and the
training pipeline's batching, shuffling, resumption and augmentation."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

from madry_ns import data
from madry_ns.errors import DataError


# ----------------------------------------------------------------------------------------
# Madry's pickles


@pytest.mark.parametrize("protocol", ["py2", 2, pickle.DEFAULT_PROTOCOL,
                                      pickle.HIGHEST_PROTOCOL])
def test_madry_pickles_round_trip(tmp_path, madry_pickles, protocol):
    written = madry_pickles(tmp_path, n_train_per_batch=6, n_test=5, protocol=protocol)
    ds = data.load_madry_pickles(written["data_path"])
    assert ds.train_images.shape == (30, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (5, 32, 32, 3) and ds.test_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images, written["train_images"])
    np.testing.assert_array_equal(ds.test_images, written["test_images"])
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train_labels, written["train_labels"])
    np.testing.assert_array_equal(ds.test_labels, written["test_labels"])
    assert ds.label_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                              "horse", "ship", "truck"]


def test_pickle_rows_are_channel_major(tmp_path, write_pickle):
    # Row layout written by hand: 1024 red values, then 1024 green, then 1024 blue.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20),
                          np.arange(1024) % 256]).astype(np.uint8)
    path = tmp_path / "test_batch"
    write_pickle({b"data": row[None], b"labels": [3]}, path, 2)
    x, y = data._read_batch(str(path))
    assert x.shape == (1, 32, 32, 3)
    assert (x[0, ..., 0] == 10).all() and (x[0, ..., 1] == 20).all()
    # Blue channel, row-major: pixel (r, c) holds (32 r + c) mod 256.
    np.testing.assert_array_equal(x[0, ..., 2], (np.arange(1024) % 256).reshape(32, 32))
    assert y.tolist() == [3]


class _Payload:
    """Unpickling this calls `fn(*args)`: the classic pickle code-execution payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile(kind, marker):
    if kind == "os.system":
        return _Payload(os.system, f"touch {marker}")
    if kind == "open":
        return _Payload(open, str(marker), "w")
    if kind == "nested":  # a valid-looking batch whose labels smuggle the payload
        return {b"data": np.zeros((1, 3072), np.uint8),
                b"labels": [_Payload(open, str(marker), "w")]}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["os.system", "open", "nested"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, madry_pickles, write_pickle, kind,
                                                 protocol):
    written = madry_pickles(tmp_path, 2, 2)
    marker = tmp_path / "pwned"
    victim = os.path.join(written["data_path"], "data_batch_2")
    write_pickle(_hostile(kind, marker), victim, protocol)
    with pytest.raises(DataError) as info:
        data.load_madry_pickles(written["data_path"])
    assert "data_batch_2" in str(info.value) and "refusing to unpickle" in str(info.value)
    assert not marker.exists()


def test_truncated_pickle_is_a_data_error(tmp_path, madry_pickles):
    written = madry_pickles(tmp_path, 4, 2)
    path = os.path.join(written["data_path"], "test_batch")
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    with pytest.raises(DataError, match="test_batch.*truncated"):
        data.load_madry_pickles(written["data_path"])


def test_empty_and_garbage_files_are_data_errors(tmp_path, madry_pickles):
    written = madry_pickles(tmp_path, 2, 2)
    path = os.path.join(written["data_path"], "data_batch_1")
    for blob in [b"", b"not a pickle at all"]:
        with open(path, "wb") as f:
            f.write(blob)
        with pytest.raises(DataError, match="data_batch_1"):
            data.load_madry_pickles(written["data_path"])


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _replace_batch(written, name, batch):
    _dump(batch, os.path.join(written["data_path"], name))


@pytest.mark.parametrize("bad_data, found", [
    (np.zeros((2, 3072), np.float32), "float32 array of shape (2, 3072)"),
    (np.zeros((2, 3072), np.int64), "int64 array"),
    (np.zeros((2, 3071), np.uint8), "shape (2, 3071)"),
    (np.zeros((2, 3, 32, 32), np.uint8), "shape (2, 3, 32, 32)"),
    ([[0] * 3072] * 2, "list"),
])
def test_wrong_dtype_or_shape_of_data_is_refused(tmp_path, madry_pickles, bad_data, found):
    written = madry_pickles(tmp_path, 2, 2)
    _replace_batch(written, "data_batch_4", {b"data": bad_data, b"labels": [1, 2]})
    with pytest.raises(DataError) as info:
        data.load_madry_pickles(written["data_path"])
    message = str(info.value)
    assert "data_batch_4" in message and "uint8 array of shape (N, 3072)" in message
    assert found in message


@pytest.mark.parametrize("labels, expected", [
    ([0, 10], "labels must be in 0..9"),
    ([-1, 3], "labels must be in 0..9"),
    ([1], "must be a list of 2 integers"),
    ([1, 2, 3], "must be a list of 2 integers"),
    ([1.0, 2.0], "must be a list of 2 integers"),
    ("12", "must be a list of 2 integers"),
])
def test_bad_labels_are_refused(tmp_path, madry_pickles, labels, expected):
    written = madry_pickles(tmp_path, 2, 2)
    _replace_batch(written, "test_batch", {b"data": np.zeros((2, 3072), np.uint8),
                                           b"labels": labels})
    with pytest.raises(DataError, match=expected) as info:
        data.load_madry_pickles(written["data_path"])
    assert "test_batch" in str(info.value)


def test_batch_that_is_not_a_dict_with_data_and_labels_is_refused(tmp_path, madry_pickles):
    written = madry_pickles(tmp_path, 2, 2)
    _replace_batch(written, "data_batch_5", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match=r"data_batch_5.*b'data' and b'labels'"):
        data.load_madry_pickles(written["data_path"])
    _replace_batch(written, "data_batch_5", [1, 2, 3])
    with pytest.raises(DataError, match=r"data_batch_5.*found list"):
        data.load_madry_pickles(written["data_path"])


def test_meta_without_ten_label_names_is_refused(tmp_path, madry_pickles):
    written = madry_pickles(tmp_path, 2, 2)
    _dump({b"label_names": [b"a", b"b"]}, os.path.join(written["data_path"], "batches.meta"))
    with pytest.raises(DataError, match="batches.meta.*10 byte strings"):
        data.load_madry_pickles(written["data_path"])


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_missing_file_is_named(tmp_path, madry_pickles, name):
    written = madry_pickles(tmp_path, 2, 2)
    os.remove(os.path.join(written["data_path"], name))
    with pytest.raises(DataError) as info:
        data.load_madry_pickles(written["data_path"])
    assert os.path.join(written["data_path"], name) in str(info.value)
    assert "not found" in str(info.value)


# ----------------------------------------------------------------------------------------
# tensorflow_datasets (offline) and dispatch


def test_tfds_offline_fails_fast_with_instructions(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.load_tfds_cifar10(data_dir=str(empty))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert str(empty) in message
    assert "cifar-10-python.tar.gz" in message and "data_path" in message
    assert "download_and_prepare" in message and '"dataset": "digits"' in message


def test_tfds_success_path_with_mock_data(mock_tfds_cifar10):
    with mock_tfds_cifar10(num_examples=12):
        ds = data.load_tfds_cifar10()
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (12, 32, 32, 3) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() <= 9
    assert ds.label_names[0] == "airplane" and ds.label_names[-1] == "truck"
    assert ds.train_images.std() > 0  # real arrays, not placeholders


def test_load_dataset_dispatch(tmp_path, madry_pickles, tiny_config, monkeypatch):
    written = madry_pickles(tmp_path, 2, 3)
    ds = data.load_dataset(tiny_config(tmp_path, dataset="cifar10",
                                       data_path=written["data_path"]))
    assert ds.source.startswith("CIFAR-10 pickles")
    np.testing.assert_array_equal(ds.test_images, written["test_images"])

    a_file = tmp_path / "data_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="exists but is not a directory"):
        data.load_dataset(tiny_config(tmp_path, dataset="cifar10", data_path=str(a_file)))

    # No data_path and no prepared tfds copy (tfds reads TFDS_DATA_DIR at import, so the
    # already-imported module's default is redirected too).
    import tensorflow_datasets as tfds

    empty = tmp_path / "tfds"
    empty.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(empty))
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        data.load_dataset(tiny_config(tmp_path, dataset="cifar10",
                                      data_path=str(tmp_path / "absent")))

    digits = data.load_dataset(tiny_config(tmp_path, dataset="digits",
                                           data_path=str(tmp_path / "absent")))
    assert digits.source == "scikit-learn digits"


# ----------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_fixed_split():
    from sklearn.datasets import load_digits

    ds = data.load_digits()
    assert ds.train_images.shape == (1497, 32, 32, 3) and ds.test_images.shape == (300, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int64
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    assert ds.label_names == [str(i) for i in range(10)]

    raw = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    test_idx, train_idx = order[:300], order[300:]
    np.testing.assert_array_equal(ds.test_labels, raw.target[test_idx])
    np.testing.assert_array_equal(ds.train_labels, raw.target[train_idx])
    # Each 8x8 value v in 0..16 becomes a 4x4 block of round(v * 255 / 16) in every channel.
    expected = np.round(raw.images[test_idx] * 255.0 / 16.0)
    expected = np.kron(expected, np.ones((4, 4)))
    for c in range(3):
        np.testing.assert_array_equal(ds.test_images[..., c], expected)
    assert set(np.unique(ds.test_images)) <= {int(round(v * 255 / 16)) for v in range(17)}


def test_digits_is_deterministic():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)


# ----------------------------------------------------------------------------------------
# Training pipeline


def _indexed_images(n):
    """Image i is filled with the value i, so a batch names its source indices."""
    return np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 1, 1), np.uint8)


def _stream(n, batch_size, steps, order_seed=7, start_step=0, augment_seed=3):
    images = _indexed_images(n)
    labels = (np.arange(n) * 3) % 10
    pipe = data.train_pipeline(images, labels, batch_size, order_seed=order_seed,
                               augment_seed=augment_seed, start_step=start_step,
                               augmentation="none")
    out = []
    for step, x, y in pipe.take(steps).as_numpy_iterator():
        idx = x[:, 0, 0, 0].astype(np.int64)
        assert x.dtype == np.float32 and x.shape == (batch_size, 1, 1, 1)
        np.testing.assert_array_equal(y, (idx * 3) % 10)  # labels travel with their images
        out.append((int(step), idx))
    return out


def test_batches_are_full_and_each_pass_is_a_fresh_shuffle_without_its_tail():
    n, bs = 37, 8
    per_pass = n // bs                                  # 4 batches; 5 images dropped per pass
    stream = _stream(n, bs, per_pass * 6)
    assert [s for s, _ in stream] == list(range(per_pass * 6))
    passes = [np.concatenate([idx for _, idx in stream[p * per_pass:(p + 1) * per_pass]])
              for p in range(6)]
    for used in passes:
        assert len(used) == per_pass * bs and len(set(used.tolist())) == per_pass * bs
        assert set(used.tolist()) <= set(range(n))
    # Passes reshuffle: different orders and different dropped tails.
    assert len({tuple(p) for p in passes}) == 6
    assert len({frozenset(range(n)) - frozenset(p.tolist()) for p in passes}) > 1


def test_shuffle_is_uniform_over_passes():
    # 10 images, batches of 3: one image dropped per pass. Over 300 passes every image is
    # dropped about 30 times, and the first slot holds every image about 30 times.
    stream = _stream(10, 3, 3 * 300)
    dropped = np.zeros(10)
    first = np.zeros(10)
    for p in range(300):
        used = np.concatenate([idx for _, idx in stream[3 * p:3 * p + 3]])
        dropped[list(set(range(10)) - set(used.tolist()))] += 1
        first[used[0]] += 1
    assert dropped.sum() == 300
    assert dropped.min() >= 12 and dropped.max() <= 50, dropped
    assert first.min() >= 12 and first.max() <= 50, first


def test_same_seed_same_stream_and_other_seed_differs():
    a = _stream(37, 8, 10, order_seed=7)
    b = _stream(37, 8, 10, order_seed=7)
    c = _stream(37, 8, 10, order_seed=8)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))


@pytest.mark.parametrize("start", [1, 3, 4, 9])
def test_starting_at_step_s_continues_the_uninterrupted_stream(start):
    full = _stream(37, 8, 14)
    resumed = _stream(37, 8, 14 - start, start_step=start)
    assert [s for s, _ in resumed] == list(range(start, 14))
    for (s1, x1), (s2, x2) in zip(full[start:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(x1, x2)


def test_resumed_augmentation_matches_uninterrupted():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20) % 10

    def batches(start, count):
        pipe = data.train_pipeline(images, labels, 4, order_seed=1, augment_seed=2,
                                   start_step=start, augmentation="madry")
        return [x for _, x, _ in pipe.take(count).as_numpy_iterator()]

    full, resumed = batches(0, 8), batches(5, 3)
    for a, b in zip(full[5:], resumed):
        np.testing.assert_array_equal(a, b)


def test_batch_size_larger_than_dataset_is_a_data_error():
    with pytest.raises(DataError, match="exceeds the 5 training images"):
        data.train_pipeline(_indexed_images(5), np.zeros(5), 8, 0, 0)


def _crop_matches(augmented, image):
    """All (row offset, col offset, flipped) with augmented == crop of the zero-padded image."""
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    found = []
    for r in range(5):
        for c in range(5):
            crop = padded[r:r + 32, c:c + 32]
            if np.array_equal(augmented, crop):
                found.append((r, c, False))
            if np.array_equal(augmented, crop[:, ::-1]):
                found.append((r, c, True))
    return found


def _augmented_with_sources(mode, steps=16, batch_size=16):
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (40, 32, 32, 3), dtype=np.uint8)
    # The label is the image index, to find each augmented image's source.
    pipe = data.train_pipeline(images, np.arange(40), batch_size, order_seed=5,
                               augment_seed=6, augmentation=mode)
    for _, x, idx in pipe.take(steps).as_numpy_iterator():
        for xi, i in zip(x, idx):
            yield xi, images[i]


def test_madry_augmentation_is_a_crop_of_the_padded_image_maybe_flipped():
    seen = []
    for aug, source in _augmented_with_sources("madry"):
        matches = _crop_matches(aug, source)
        assert len(matches) == 1, matches
        seen.append(matches[0])
    flips = [f for _, _, f in seen]
    offsets = {(r, c) for r, c, _ in seen}
    assert 0.35 < np.mean(flips) < 0.65                # 256 images, flip probability 1/2
    assert offsets == {(r, c) for r in range(5) for c in range(5)}  # all 25 offsets occur
    rows = np.array([r for r, _, _ in seen])
    assert all(20 < (rows == r).sum() < 85 for r in range(5))        # about 51 each


def test_crop_augmentation_never_flips():
    seen = []
    for aug, source in _augmented_with_sources("crop", steps=4):
        matches = _crop_matches(aug, source)
        assert len(matches) == 1 and matches[0][2] is False, matches
        seen.append(matches[0][:2])
    assert len(set(seen)) > 5


def test_no_augmentation_is_identity():
    for aug, source in _augmented_with_sources("none", steps=2):
        np.testing.assert_array_equal(aug, source.astype(np.float32))


def test_augmentation_differs_across_steps_for_the_same_image():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    x = tf.constant(rng.integers(0, 256, (16, 32, 32, 3)), tf.float32)
    a = data.augment_batch(x, tf.constant([1, 0], tf.int64))
    b = data.augment_batch(x, tf.constant([1, 1], tf.int64))
    again = data.augment_batch(x, tf.constant([1, 0], tf.int64))
    np.testing.assert_array_equal(a.numpy(), again.numpy())
    assert not np.array_equal(a.numpy(), b.numpy())


# ----------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_are_the_first_n_in_order_with_a_partial_last_batch():
    images = _indexed_images(30)
    labels = np.arange(30) % 10
    batches = list(data.eval_batches(images, labels, num_examples=23, batch_size=8))
    assert [len(x) for x, _ in batches] == [8, 8, 7]
    got = np.concatenate([x[:, 0, 0, 0] for x, _ in batches])
    np.testing.assert_array_equal(got, np.arange(23))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[:23])
    assert all(x.dtype == np.float32 for x, _ in batches)


def test_eval_batches_refuse_more_examples_than_the_test_set():
    with pytest.raises(DataError, match="num_eval_examples 31 exceeds the 30"):
        list(data.eval_batches(_indexed_images(30), np.zeros(30), 31, 8))
