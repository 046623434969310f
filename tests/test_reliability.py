"""Reliability: interruption, non-finite values, atomic outputs, bad checkpoints, fuzzed configs."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from madry_ns import checkpoints, files, training
from madry_ns import config as config_lib
from madry_ns.errors import CheckpointError, ConfigError
from madry_ns.models import MadryWRN, ResNet20

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"dataset": "digits", "model_width": 1, "training_batch_size": 8, "num_steps": 1,
        "num_output_steps": 1, "num_summary_steps": 1, "augmentation": "crop"}


def _config(tmp_path, **kw):
    return config_lib.from_dict({"model_dir": str(tmp_path / "model"), **TINY, **kw})


def _weights(path):
    """Every model weight, BN statistic and optimizer slot of a checkpoint, by name (not the
    count of saves, which an interrupted run has more of)."""
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def _assert_same_checkpoint(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _script(tmp_path, config, *extra):
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", str(path), *extra], env


# ----- non-finite values --------------------------------------------------------------------

def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e38 from step 3 on: the update of step 3 blows the weights up, step 4's loss is NaN.
    config = _config(tmp_path, max_num_training_steps=8, num_checkpoint_steps=2,
                     step_size_schedule=[[0, 0.1], [3, 1e38]])
    with pytest.raises(training.TrainingStopped, match=r"non-finite .* at step \d") as info:
        training.train(config, out=lambda *a: None)
    assert info.value.exit_code == 1
    step = int(str(info.value).split("at step ")[1].split(" ")[0])
    latest = tf.train.latest_checkpoint(config.model_dir)
    assert checkpoints.checkpoint_step(latest) <= step
    weights = _weights(latest)
    assert all(np.isfinite(w).all() for w in weights.values() if w.dtype.kind == "f")


def test_nonfinite_batch_is_skipped_with_weights_and_bn_statistics_untouched(tmp_path):
    config = _config(tmp_path, on_nonfinite="skip")
    tf.keras.utils.set_random_seed(0)
    model = MadryWRN(width=1).build_for_input()
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, config)
    before = [v.numpy().copy() for v in model.weights]
    x = np.full((8, 32, 32, 3), 100.0, np.float32)
    x[0, 0, 0, 0] = np.nan
    metrics = step(tf.constant(x), tf.zeros([8], tf.int64), tf.constant(0, tf.int64))
    assert not bool(metrics["finite"])
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())      # weights and moving statistics
    assert int(optimizer.iterations) == 1                 # the step still counts


def test_skip_policy_logs_the_skipped_step_and_training_continues(tmp_path):
    config = _config(tmp_path, max_num_training_steps=6, num_checkpoint_steps=10,
                     on_nonfinite="skip", step_size_schedule=[[0, 0.1], [3, 1e38]])
    lines = []
    final = training.train(config, out=lines.append)
    assert checkpoints.checkpoint_step(final) == 6
    skipped = [json.loads(line) for line in
               open(os.path.join(config.model_dir, "nonfinite.jsonl"))]
    assert skipped and all(r["step"] > 3 for r in skipped)
    assert any("batch skipped" in line for line in lines)


# ----- interruption -------------------------------------------------------------------------

def _uninterrupted(tmp_path_factory, steps, every):
    out = tmp_path_factory.mktemp("reference")
    config = _config(out, max_num_training_steps=steps, num_checkpoint_steps=every)
    return training.train(config, out=lambda *a: None)


@pytest.fixture(scope="module")
def reference_12(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, 12, 4)


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=[pytest.mark.slow,
                                                                    pytest.mark.extended])])
def test_signal_saves_the_current_step_exits_cleanly_and_resume_matches(tmp_path, sig,
                                                                        reference_12):
    config = _config(tmp_path, max_num_training_steps=12, num_checkpoint_steps=4)
    cmd, env = _script(tmp_path, config)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:                      # wait until training is under way
        if line.startswith("Step 2:"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name} at step" in err
    assert "Traceback" not in err
    step = int(err.split("at step ")[1].split(":")[0])
    latest = tf.train.latest_checkpoint(config.model_dir)
    assert checkpoints.checkpoint_step(latest) == step
    assert int(tf.train.load_checkpoint(latest).get_tensor(
        "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == step
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    _assert_same_checkpoint(tf.train.latest_checkpoint(config.model_dir), reference_12)


@pytest.mark.slow
@pytest.mark.parametrize("num_kills", [3, pytest.param(10, marks=pytest.mark.extended)])
def test_kill_9_at_random_moments_never_loses_more_than_the_current_step(
        tmp_path, tmp_path_factory, num_kills):
    """SIGKILL at `num_kills` random moments (CI: 3; `-m extended`: 10), checkpointing every
    step, so some kills land inside a save; after each the latest checkpoint loads, and the
    resumed run ends bit-identical to an uninterrupted one: no step trained twice or skipped."""
    steps = 14
    # Saving every step or only the last leaves the same step-14 weights: one save suffices.
    reference = _uninterrupted(tmp_path_factory, steps, steps)
    config = _config(tmp_path, max_num_training_steps=steps, num_checkpoint_steps=1)
    cmd, env = _script(tmp_path, config)
    rng = random.Random(1234)
    kills = 0
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if kills < num_kills:
            # Wait for the first report, then kill a random fraction of a second later.
            for line in proc.stdout:
                if line.startswith("Step"):
                    break
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()
            proc.communicate()
            kills += 1
            latest = tf.train.latest_checkpoint(config.model_dir)
            if latest:  # the latest is always complete and loadable
                model = MadryWRN(width=1).build_for_input()
                checkpoints.load_weights(model, latest)
            continue
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        break
    _assert_same_checkpoint(tf.train.latest_checkpoint(config.model_dir), reference)


# ----- atomic outputs -----------------------------------------------------------------------

class _DiskFull:
    """Make writes fail with ENOSPC after `allowed` bytes, as a full disk would."""

    def __init__(self, monkeypatch, allowed=10):
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *a, **kw):
            f = real_fdopen(fd, mode, *a, **kw)
            real_write = f.write
            state = {"n": 0}

            def write(data):
                state["n"] += len(data)
                if state["n"] > allowed:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_write(data)

            f.write = write
            return f

        monkeypatch.setattr(files.os, "fdopen", fdopen)


@pytest.mark.parametrize("writer", ["text", "npy", "append"])
def test_a_full_disk_leaves_the_old_file_intact_and_no_temporary_file(tmp_path, monkeypatch,
                                                                      writer):
    target = tmp_path / ("out.npy" if writer == "npy" else "out.txt")
    if writer == "npy":
        np.save(target, np.arange(5.0))
        old = target.read_bytes()
    else:
        target.write_text("old line\n")
        old = target.read_bytes()
    _DiskFull(monkeypatch)
    with pytest.raises(OSError) as info:
        if writer == "text":
            files.atomic_write_text(str(target), "x" * 1000)
        elif writer == "npy":
            files.atomic_save_npy(str(target), np.zeros((100, 100)))
        else:
            files.atomic_append_line(str(target), "y" * 1000)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == [target.name]


# ----- bad checkpoints ----------------------------------------------------------------------

def _save(model, path):
    return tf.train.Checkpoint(model=model).write(str(path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.load_weights(MadryWRN(width=1).build_for_input(), str(tmp_path / "nope"))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = _save(MadryWRN(width=1).build_for_input(), tmp_path / "ck")
    data = path + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        checkpoints.load_weights(MadryWRN(width=1).build_for_input(), path)


def test_checkpoint_of_another_width_names_the_first_mismatching_variable(tmp_path):
    path = _save(MadryWRN(width=2).build_for_input(), tmp_path / "ck")
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_weights(MadryWRN(width=1).build_for_input(), path)
    assert "'model/unit_1_0/conv1/_kernel' has shape [3, 3, 16, 32]" in str(info.value)
    assert "expects [3, 3, 16, 16]" in str(info.value)


def test_checkpoint_of_another_architecture_names_the_missing_variable(tmp_path):
    path = _save(ResNet20(width=1).build_for_input(), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="has no variable 'model/unit_1_0/bn1/gamma'"):
        checkpoints.load_weights(MadryWRN(width=1).build_for_input(), path)


def test_resuming_with_another_width_fails_without_touching_the_checkpoints(tmp_path):
    config = _config(tmp_path, max_num_training_steps=1, num_checkpoint_steps=1)
    training.train(config, out=lambda *a: None)
    before = sorted(os.listdir(config.model_dir))
    with pytest.raises(CheckpointError, match="another \"model_width\""):
        training.train(config.replace(model_width=2, max_num_training_steps=2),
                       out=lambda *a: None)
    assert sorted(os.listdir(config.model_dir)) == before


# ----- fuzzed configs -----------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12)
                     | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_keys = st.sampled_from([f.name for f in config_lib.fields()]) | st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=6))
def test_config_validation_never_crashes_and_never_accepts_an_invalid_value(raw):
    try:
        config = config_lib.from_dict(raw)
    except ConfigError:
        return
    # Accepted: every value has the declared type and passes its check.
    for f in config_lib.fields():
        value = getattr(config, f.name)
        if value is None:
            assert f.type.endswith("| None")
            continue
        check = f.metadata["check"]
        assert check is None or check(value) is None, (f.name, value)
    assert set(k for k in raw if not k.startswith("_")) <= {f.name for f in config_lib.fields()}
