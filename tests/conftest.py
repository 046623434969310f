"""Shared fixtures: quiet TensorFlow, Madry-format CIFAR-10 pickles, tiny configs.

Files in Madry's format are written here from scratch (CIFAR-10 itself is not available
offline); each test that needs data gets its own small set in `tmp_path`.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import struct
import tempfile

# Before anything imports TensorFlow: keep its C++ banner out of the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per test worker (and the scripts it starts): with one worker per
    # core, TensorFlow's per-process pools would otherwise oversubscribe the cores and spin.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
               b"horse", b"ship", b"truck"]
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


class Py2StylePickler(pickle._Pickler):
    """Pickles the way Python 2 wrote the real CIFAR-10 files: protocol 2, byte strings as
    BINSTRING opcodes (not `_codecs.encode`), numpy functions under `numpy.core.*`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj):  # a Python 2 `str` is a byte string
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        name = name or obj.__qualname__
        if module and module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[type] = save_global


def dump_pickle(obj, path, protocol):
    """Write `obj` to `path`; protocol "py2" imitates the files Python 2 wrote."""
    with open(path, "wb") as f:
        if protocol == "py2":
            Py2StylePickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=protocol)


def cifar_batch(images_nhwc: np.ndarray, labels, batch_label: bytes) -> dict:
    """A CIFAR-10 python batch dict: channel-major rows (1024 R, 1024 G, 1024 B)."""
    n = len(images_nhwc)
    return {b"batch_label": batch_label,
            b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2).reshape(n, 3072)),
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)]}


def make_madry_pickles(path, n_train_per_batch: int = 8, n_test: int = 8, protocol=2,
                       seed: int = 0) -> dict:
    """Write data_batch_1..5, test_batch and batches.meta to `path/cifar10_data`.

    Returns the NHWC images and labels written, for comparison: `train_images`,
    `train_labels` (the five batches concatenated in file order), `test_images`,
    `test_labels`, `data_path`.
    """
    rng = np.random.default_rng(seed)
    data_path = os.path.join(str(path), "cifar10_data")
    os.makedirs(data_path, exist_ok=True)
    train_x, train_y = [], []
    for i, name in enumerate(TRAIN_FILES):
        x = rng.integers(0, 256, (n_train_per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n_train_per_batch)
        dump_pickle(cifar_batch(x, y, f"training batch {i + 1} of 5".encode()),
                    os.path.join(data_path, name), protocol)
        train_x.append(x)
        train_y.append(y)
    test_x = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test)
    dump_pickle(cifar_batch(test_x, test_y, b"testing batch 1 of 1"),
                os.path.join(data_path, "test_batch"), protocol)
    dump_pickle({b"label_names": list(LABEL_NAMES), b"num_cases_per_batch": n_train_per_batch,
                 b"num_vis": 3072}, os.path.join(data_path, "batches.meta"), protocol)
    return {"data_path": data_path, "train_images": np.concatenate(train_x),
            "train_labels": np.concatenate(train_y), "test_images": test_x,
            "test_labels": test_y}


def make_mock_tfds_cifar10(num_examples, seed=0):
    """tfds.testing.mock_data whose examples carry tfds cifar10's ids ("test_00042"), in a
    shuffled storage order, random images and labels; `.images[split]` etc. hold them in
    index order. (tfds' own mock draws random strings as ids.)"""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    images = {s: rng.integers(0, 256, (num_examples, 32, 32, 3), np.uint8)
              for s in ("train", "test")}
    labels = {s: rng.integers(0, 10, num_examples) for s in ("train", "test")}
    storage = {s: rng.permutation(num_examples) for s in ("train", "test")}

    def as_dataset(self, split, **kwargs):
        name = str(split)
        order = storage[name]
        return tf.data.Dataset.from_tensor_slices({
            "id": [f"{name}_{i:05d}".encode() for i in order],
            "image": images[name][order], "label": labels[name][order]})

    mock = tfds.testing.mock_data(as_dataset_fn=as_dataset)
    mock.images, mock.labels, mock.storage = images, labels, storage
    return mock


def make_tiny_config(tmp_path, **overrides):
    """A validated Config for seconds-long runs: digits, narrow WRN, batch 8, PGD-2."""
    from madry_ns import config as config_lib

    values = {"model_dir": os.path.join(str(tmp_path), "model"), "dataset": "digits",
              "model_width": 1, "training_batch_size": 8, "max_num_training_steps": 4,
              "num_output_steps": 2, "num_summary_steps": 2, "num_checkpoint_steps": 2,
              "step_size_schedule": [[0, 0.1], [2, 0.01]], "num_eval_examples": 16,
              "eval_batch_size": 8, "epsilon": 8.0, "num_steps": 2, "step_size": 4.0,
              "augmentation": "madry"}
    values.update(overrides)
    return config_lib.from_dict(values, source="tiny_config")


@pytest.fixture(scope="session")
def madry_pickles():
    """`madry_pickles(tmp_path, n_train_per_batch, n_test, protocol=2)` -> written arrays."""
    return make_madry_pickles


@pytest.fixture(scope="session")
def write_pickle():
    """`write_pickle(obj, path, protocol)`; protocol "py2" imitates Python 2's files."""
    return dump_pickle


@pytest.fixture(scope="session")
def mock_tfds_cifar10():
    """`mock_tfds_cifar10(num_examples, seed=0)` -> a tfds mock_data context (see
    `make_mock_tfds_cifar10`)."""
    return make_mock_tfds_cifar10


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(tmp_path, **overrides)` -> Config."""
    return make_tiny_config


# ----- test order and scheduling ----------------------------------------------------------
#
# Two things decide how long the suite takes on CI's two workers: the minutes-long tests must
# start early, and a module fixture that trains a model must be built once, not once per worker
# (xdist's default `load` scheduling sends a module's tests to both workers, so each builds it).
# `--dist loadscope` keeps fixtures on one worker but also keeps whole modules together: on a
# clean clone it left one worker alone for the last minutes (1,604 s in all, against 1,518 s
# with the default). `--dist loadgroup` cannot help: xdist 3.8 marks a group by rewriting
# `item._nodeid`, which pytest 9 no longer reads. So the hooks below schedule by shared
# fixture: the tests that share a module-scoped fixture of their own module are one unit of
# work on one worker, every other test is a unit of its own, and units go out largest first.
# (`bash .ci/run` on a clean clone of the commit that brought it: 1,569 s, against 1,595 s for
# the CI before it, with one test more.)

_GROUPS_KEY = "madry_ns_shared_fixture_groups"


def shared_fixture_groups(items) -> dict:
    """{nodeid: unit} for the tests that share a module-scoped fixture defined in their own
    module; tests sharing such a fixture, directly or through another, get the same unit."""
    parent = {}

    def find(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    uses = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = getattr(item, "module", None)
        if info is None or module is None:
            continue
        module_id = item.nodeid.split("::", 1)[0]
        names = sorted(f"{module_id}::{name}" for name, defs in info.name2fixturedefs.items()
                       if defs[-1].scope == "module" and defs[-1].baseid == module_id)
        if names:
            uses[item.nodeid] = names
            for name in names[1:]:
                parent[find(name)] = find(names[0])
    return {nodeid: find(names[0]) for nodeid, names in uses.items()}


def pytest_collection_modifyitems(config, items):
    """Put the largest units first: tests that share a module fixture, then the slow
    (end-to-end) tests, then the rest; xdist then hands out units in this order. A worker
    writes its units for the controller's scheduler (below)."""
    groups = shared_fixture_groups(items)
    items.sort(key=lambda item: (item.nodeid not in groups,
                                 item.get_closest_marker("slow") is None))
    folder = getattr(config, "workerinput", {}).get(_GROUPS_KEY)
    if folder:
        target = os.path.join(folder, config.workerinput["workerid"] + ".json")
        with open(target + ".tmp", "w") as f:
            json.dump(groups, f)
        os.replace(target + ".tmp", target)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(xdist, controller) Tell each worker where to write its shared-fixture units."""
    config = node.config
    if not hasattr(config, "_madry_ns_groups"):
        config._madry_ns_groups = tempfile.mkdtemp(prefix="madry_ns_test_units_")
    node.workerinput[_GROUPS_KEY] = config._madry_ns_groups


def pytest_unconfigure(config):
    folder = getattr(config, "_madry_ns_groups", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """(xdist, controller) For the default `--dist load`: one unit per shared fixture (see
    above), in the workers' collection order. Other `--dist` values keep xdist's schedulers."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        units = None

        def _split_scope(self, nodeid):
            if self.units is None:
                folder = getattr(config, "_madry_ns_groups", None)
                found = sorted(glob.glob(os.path.join(folder, "*.json"))) if folder else []
                # All workers collect the same tests (xdist checks), so any one file will do;
                # without one every test is its own unit, as under plain `load`.
                self.units = {}
                if found:
                    with open(found[0]) as f:
                        self.units = json.load(f)
            return self.units.get(nodeid, nodeid)

    return SharedFixtureScheduling(config, log)
