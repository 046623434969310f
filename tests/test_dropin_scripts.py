"""Madry's drop-in scripts: eval.py, pgd_attack.py, run_attack.py, on tiny Madry-format data.

Library functions are tested in-process; a few subprocess runs check the scripts
themselves (console lines, exit status) as a user runs them, with stdout a pipe.
"""

import glob
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from helpers_dropin import (run_script, tiny_config, write_config, write_madry_cifar,
                            write_madry_tf1_checkpoint)
from madry_ns import attack_file, challenge, checkpoints, data, evaluation, models, training
from madry_ns.errors import AttackFileError, CheckpointError, UserError

MADRY_EVAL_TAGS = {"xent adv eval", "xent adv", "xent nat", "accuracy adv eval",
                   "accuracy adv", "accuracy nat"}
TRAIN_OVERLAY_TAGS = {"accuracy_adv", "xent_adv"}  # written by train.py too


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A width-1 WRN trained for 2 steps on tiny Madry-format data (checkpoint-0..2)."""
    root = tmp_path_factory.mktemp("trained")
    write_madry_cifar(root / "cifar10_data")
    config = tiny_config(root)
    training.train(config, out=lambda *a: None)
    return root, config


def read_events(folder):
    """{tag: [(step, scalar value or None), ...]} from every event file in `folder`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)  # images (train dir) are not scalars
                found.setdefault(value.tag, []).append(
                    (event.step, float(array) if array.ndim == 0 else None))
    return found


def fresh_model(config):
    return models.build_model(config)


# ---------------------------------------------------------------------------------------
# eval.py


def test_eval_once_prints_madry_lines_and_writes_tags_and_metrics(trained, tmp_path):
    root, config = trained
    config = config.replace(model_dir=str(tmp_path / "model"))
    shutil.copytree(root / "model", tmp_path / "model")
    lines = []
    dataset = data.load_dataset(config)
    [record] = evaluation.watch(config, fresh_model(config), dataset, once=True,
                                out=lines.append)

    assert re.fullmatch(r"Checkpoint .*checkpoint-2, evaluating \.\.\.   \(.*\)", lines[0])
    # stdout is not a terminal under pytest: Madry's three lines per batch (he printed the
    # configured batch size, also for the short last batch).
    per_batch = lines[1:10]
    assert per_batch[0::3] == [4, 4, 4]
    assert all(re.fullmatch(r"Correctly classified natural examples: \d", s)
               for s in per_batch[1::3])
    assert all(re.fullmatch(r"Correctly classified adversarial examples: \d", s)
               for s in per_batch[2::3])
    nat_correct = sum(int(s.rsplit(" ", 1)[1]) for s in per_batch[1::3])
    adv_correct = sum(int(s.rsplit(" ", 1)[1]) for s in per_batch[2::3])
    assert record["natural_accuracy"] == nat_correct / 10
    assert record["adversarial_accuracy"] == adv_correct / 10
    assert lines[10:] == [f"natural: {nat_correct * 10:.2f}%",
                          f"adversarial: {adv_correct * 10:.2f}%",
                          f"avg nat loss: {record['avg_nat_loss']:.4f}",
                          f"avg adv loss: {record['avg_adv_loss']:.4f}"]

    events = read_events(os.path.join(config.model_dir, "eval"))
    assert set(events) == MADRY_EVAL_TAGS | TRAIN_OVERLAY_TAGS
    expected = {"accuracy adv eval": record["adversarial_accuracy"],
                "accuracy adv": record["adversarial_accuracy"],
                "accuracy_adv": record["adversarial_accuracy"],
                "accuracy nat": record["natural_accuracy"],
                "xent adv eval": record["avg_adv_loss"], "xent adv": record["avg_adv_loss"],
                "xent_adv": record["avg_adv_loss"], "xent nat": record["avg_nat_loss"]}
    for tag, value in expected.items():
        [(step, logged)] = events[tag]
        assert step == 2 and logged == pytest.approx(value, rel=1e-6), tag
    # The overlay tags are the very names train.py wrote into model_dir.
    assert TRAIN_OVERLAY_TAGS <= set(read_events(config.model_dir))

    with open(os.path.join(config.model_dir, "eval", "metrics.jsonl")) as f:
        [saved] = [json.loads(line) for line in f]
    assert saved["step"] == 2 and saved["checkpoint"].endswith("checkpoint-2")
    assert saved["num_examples"] == 10 and saved["inference_bn"] == "population"
    assert saved["attack_settings"] == {"epsilon": 8.0, "num_steps": 2, "step_size": 2.0,
                                        "random_start": True, "loss_func": "xent",
                                        "eval_attack_bn": "inference"}
    assert saved["attack"].endswith("white-box through PN")
    assert saved["inference"] == "PN (population statistics)"
    for key in ("natural_accuracy", "adversarial_accuracy", "avg_nat_loss", "avg_adv_loss"):
        assert saved[key] == record[key]


def test_eval_on_a_terminal_shows_a_progress_bar_instead_of_per_batch_lines(
        trained, tmp_path, monkeypatch):
    root, config = trained
    config = config.replace(model_dir=str(tmp_path / "model"))
    monkeypatch.setattr(evaluation, "is_terminal", lambda stream=None: True)
    lines = []
    evaluation.watch(config, fresh_model(config), data.load_dataset(config),
                     checkpoint=str(root / "model" / "checkpoint-1"), out=lines.append)
    assert len(lines) == 5 and lines[1].startswith("natural: ")
    [record] = [json.loads(s) for s in open(tmp_path / "model" / "eval" / "metrics.jsonl")]
    assert record["step"] == 1  # --checkpoint evaluates the one named


def test_evaluation_is_deterministic_across_runs(trained):
    _, config = trained
    dataset = data.load_dataset(config)
    model = fresh_model(config)
    checkpoints.load_weights(model, checkpoints.latest_checkpoint(config.model_dir))
    first = evaluation.evaluate(model, dataset, config)
    assert evaluation.evaluate(model, dataset, config) == first


class StopWatching(Exception):
    pass


def test_watch_polls_every_10s_and_evaluates_only_the_latest_new_checkpoint(
        trained, tmp_path, capsys):
    _, trained_config = trained
    config = trained_config.replace(model_dir=str(tmp_path / "model"))
    model = fresh_model(config)
    saver = checkpoints.Checkpointer(config.model_dir, model, tf.keras.optimizers.SGD())
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            saver.save(3)
        elif len(sleeps) == 4:  # two checkpoints between polls: only the latest is evaluated
            saver.save(5)
            saver.save(7)
        elif len(sleeps) == 5:
            raise StopWatching

    with pytest.raises(StopWatching):
        evaluation.watch(config, model, data.load_dataset(config), sleep=sleep)
    out = capsys.readouterr().out
    assert sleeps == [evaluation.POLL_SECONDS] * 5 == [10] * 5
    assert out.startswith("No checkpoint yet, waiting ....\nCheckpoint ")
    evaluated = re.findall(r"Checkpoint (\S+), evaluating", out)
    assert [os.path.basename(p.rstrip(",")) for p in evaluated] == ["checkpoint-3",
                                                                     "checkpoint-7"]
    assert re.search(r"Waiting for the next checkpoint \.\.\.   \(.*\)   \.\n?Checkpoint ", out)
    assert out.count("natural: ") == 2
    steps = [json.loads(s)["step"] for s in open(tmp_path / "model" / "eval" / "metrics.jsonl")]
    assert steps == [3, 7]


def test_eval_once_without_checkpoint_is_an_error(trained, tmp_path):
    _, config = trained
    config = config.replace(model_dir=str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        evaluation.watch(config, None, None, once=True)


# ---------------------------------------------------------------------------------------
# pgd_attack.py and run_attack.py in-process


@pytest.fixture(scope="module")
def attacked(trained, tmp_path_factory):
    """pgd_attack's file for the trained model, and eval's numbers for the same model."""
    _, config = trained
    lines = []
    path = challenge.write_attack_file(config, out=lines.append)
    dataset = data.load_dataset(config)
    model = fresh_model(config)
    checkpoints.load_weights(model, checkpoints.latest_checkpoint(config.model_dir))
    return path, lines, evaluation.evaluate(model, dataset, config), dataset


def test_pgd_attack_writes_float64_examples_in_test_order_within_epsilon(trained, attacked):
    _, config = trained
    path, lines, _, dataset = attacked
    assert lines == ["Iterating over 3 batches", "batch size: 4", "batch size: 4",
                     "batch size: 2", "Storing examples", f"Examples stored in {path}"]
    x_adv = np.load(path, allow_pickle=False)
    assert x_adv.dtype == np.float64 and x_adv.shape == (10, 32, 32, 3)
    x_nat = dataset.test_images[:10].astype(np.float64)
    assert np.abs(x_adv - x_nat).max() <= config.epsilon + 1e-4
    assert x_adv.min() >= 0 and x_adv.max() <= 255
    assert np.abs(x_adv - x_nat).reshape(10, -1).max(axis=1).min() > 0  # every image moved
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_run_attack_on_pgd_attack_output_reproduces_eval_adversarial_accuracy(
        trained, attacked, tmp_path):
    _, config = trained
    _, _, result, dataset = attacked
    lines = []
    pred_path = str(tmp_path / "pred.npy")
    out = challenge.run_attack(config, out=lines.append, pred_path=pred_path)
    assert lines == [f"Accuracy: {100 * result['adversarial_accuracy']:.2f}%",
                     f"Output saved at {pred_path}"]
    pred = np.load(pred_path, allow_pickle=False)
    assert pred.dtype == np.int64 and pred.shape == (10,)
    assert np.mean(pred == dataset.test_labels[:10]) == result["adversarial_accuracy"]
    assert out["accuracy"] == result["adversarial_accuracy"]


def test_store_adv_path_without_extension_is_written_and_read_under_one_name(
        trained, tmp_path):
    _, config = trained
    config = config.replace(store_adv_path=str(tmp_path / "my_attack"))
    path = challenge.write_attack_file(config, out=lambda *a: None)
    assert path == str(tmp_path / "my_attack.npy") and os.path.exists(path)
    challenge.run_attack(config, out=lambda *a: None, pred_path=str(tmp_path / "pred.npy"))
    assert os.path.exists(tmp_path / "pred.npy")


def test_pgd_attack_without_checkpoint_says_no_model_found(trained, tmp_path):
    _, config = trained
    config = config.replace(model_dir=str(tmp_path / "none"),
                            store_adv_path=str(tmp_path / "attack.npy"))
    with pytest.raises(CheckpointError, match="^No model found"):
        challenge.write_attack_file(config, out=lambda *a: None)
    assert os.listdir(tmp_path) == []


def _write(path, x):
    np.save(path, x)
    return str(path)


def _bad_file(kind, tmp_path, x_nat, epsilon):
    """An attack file of the catalogue; returns (path, expected message regex)."""
    x = x_nat.astype(np.float64)
    p = tmp_path / "attack.npy"
    if kind == "nan":
        x[3, 1, 2, 0] = np.nan
        return _write(p, x), r"Invalid pixel values: found 1 NaN and 0 infinite .*\(3, 1, 2, 0\)"
    if kind == "inf":
        x[0, 0, 0, 0] = np.inf
        return _write(p, x), r"found 0 NaN and 1 infinite"
    if kind == "-inf":
        x[9, 31, 31, 2] = -np.inf
        return _write(p, x), r"found 0 NaN and 1 infinite"
    if kind == "shape_count":
        return _write(p, x[:9]), re.escape("Invalid shape: expected (10, 32, 32, 3), "
                                           "found (9, 32, 32, 3)")
    if kind == "shape_gray":
        return _write(p, x[..., 0]), re.escape("Invalid shape: expected (10, 32, 32, 3), "
                                               "found (10, 32, 32)")
    if kind == "dtype_str":
        return _write(p, x.astype(str)), r"Invalid dtype: expected a numeric array .*<U"
    if kind == "dtype_complex":
        return _write(p, x.astype(np.complex128)), r"Invalid dtype: .*complex128"
    if kind == "dtype_bool":
        return _write(p, x > 128), r"Invalid dtype: .*bool"
    if kind == "object":
        return _write(p, x.astype(object)), r"pickled data .*not loaded"
    if kind == "pickle":
        with open(p, "wb") as f:
            pickle.dump(x, f)
        return str(p), r"pickled data .*not loaded"
    if kind == "npz":
        np.savez(str(tmp_path / "attack.npz"), x=x)
        os.replace(tmp_path / "attack.npz", p)
        return str(p), r"\.npz archive"
    if kind == "truncated":
        _write(p, x)
        with open(p, "r+b") as f:
            f.truncate(1000)
        return str(p), r"(truncated|not a readable)"
    if kind == "above_255":
        x[0, 0, 0, 0] = 255.001
        return _write(p, x), re.escape("Invalid pixel range. Expected [0, 255], found [")
    if kind == "below_0":
        x[0, 0, 0, 0] = -0.001
        return _write(p, x), re.escape("Invalid pixel range. Expected [0, 255], found [-0.001")
    if kind == "eps_plus_2e-4":
        i = np.argwhere(x_nat <= 200)[0]
        x[tuple(i)] += epsilon + 2e-4
        return _write(p, x), (r"maximum perturbation found: 8\.000\d+\n"
                              r"maximum perturbation allowed: 8\.0$")
    if kind == "missing":
        return str(tmp_path / "nothing_here.npy"), r"attack file .*nothing_here\.npy' not found"
    raise ValueError(kind)


CATALOGUE = ["nan", "inf", "-inf", "shape_count", "shape_gray", "dtype_str", "dtype_complex",
             "dtype_bool", "object", "pickle", "npz", "truncated", "above_255", "below_0",
             "eps_plus_2e-4", "missing"]


@pytest.mark.parametrize("kind", CATALOGUE)
def test_run_attack_refuses_every_invalid_file_and_writes_no_pred(trained, tmp_path, kind):
    _, config = trained
    x_nat = data.load_dataset(config).test_images[:10]
    path, message = _bad_file(kind, tmp_path, x_nat, config.epsilon)
    config = config.replace(store_adv_path=path)
    pred_path = tmp_path / "pred.npy"
    with pytest.raises(UserError) as err:
        challenge.run_attack(config, out=lambda *a: None, pred_path=str(pred_path))
    assert isinstance(err.value, AttackFileError) and err.value.exit_code != 0
    assert re.search(message, str(err.value)), str(err.value)
    assert not pred_path.exists()


def test_run_attack_accepts_epsilon_plus_5e_5_and_integer_arrays(trained, tmp_path):
    _, config = trained
    x_nat = data.load_dataset(config).test_images[:10]
    x = x_nat.astype(np.float64)
    i = tuple(np.argwhere(x_nat <= 200)[0])
    x[i] += config.epsilon + 5e-5
    attack_file.validate(x, x_nat, config.epsilon)
    path = _write(tmp_path / "attack.npy", x)
    result = challenge.run_attack(config.replace(store_adv_path=path), out=lambda *a: None,
                                  pred_path=str(tmp_path / "pred.npy"))
    assert result["max_perturbation"] == pytest.approx(config.epsilon + 5e-5)
    attack_file.validate(x_nat.copy(), x_nat, config.epsilon)  # uint8, as Madry accepted
    attack_file.validate(np.clip(x, 0, 255).astype(np.float32), x_nat, config.epsilon)


def test_run_attack_checks_in_madry_order(trained, tmp_path):
    _, config = trained
    # 1. the file is loaded first: a missing file is reported before a missing checkpoint
    no_model = config.replace(model_dir=str(tmp_path / "none"),
                              store_adv_path=str(tmp_path / "missing.npy"))
    with pytest.raises(AttackFileError, match="not found"):
        challenge.run_attack(no_model, out=lambda *a: None)
    # 2. then the checkpoint, before the shape
    path = _write(tmp_path / "attack.npy", np.zeros((3, 32, 32, 3)))
    with pytest.raises(CheckpointError, match="^No checkpoint found"):
        challenge.run_attack(no_model.replace(store_adv_path=path), out=lambda *a: None)
    # 3. shape before range; 4. range before the perturbation
    with pytest.raises(AttackFileError, match="^Invalid shape"):
        challenge.run_attack(config.replace(store_adv_path=path), out=lambda *a: None)
    path = _write(tmp_path / "attack.npy", np.full((10, 32, 32, 3), 300.0))
    with pytest.raises(AttackFileError, match="^Invalid pixel range"):
        challenge.run_attack(config.replace(store_adv_path=path), out=lambda *a: None)


def test_expected_shape_follows_num_eval_examples():
    x_nat = np.zeros((7, 32, 32, 3), np.uint8)
    attack_file.validate(np.zeros((7, 32, 32, 3)), x_nat, 8.0)
    with pytest.raises(AttackFileError, match=re.escape("expected (7, 32, 32, 3)")):
        attack_file.validate(np.zeros((10000, 32, 32, 3), np.float32), x_nat, 8.0)


# ---------------------------------------------------------------------------------------
# The scripts themselves (subprocesses, stdout a pipe)


@pytest.mark.slow
def test_eval_py_once_on_trained_checkpoint(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "model", tmp_path / "model")
    write_madry_cifar(tmp_path / "cifar10_data")
    write_config(tmp_path, eval_on_cpu=True)
    result = run_script("eval.py", tmp_path, "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"Checkpoint .*checkpoint-2, evaluating \.\.\.   \(.*\)", lines[0])
    assert lines[1:4] == ["4", lines[2], lines[3]]
    assert lines[2].startswith("Correctly classified natural examples: ")
    assert re.fullmatch(r"natural: \d+\.\d\d%", lines[-4])
    assert re.fullmatch(r"adversarial: \d+\.\d\d%", lines[-3])
    assert re.fullmatch(r"avg nat loss: \d+\.\d{4}", lines[-2])
    assert re.fullmatch(r"avg adv loss: \d+\.\d{4}", lines[-1])
    assert os.path.exists(tmp_path / "model" / "eval" / "metrics.jsonl")


@pytest.fixture(scope="module")
def tf1_workdir(tmp_path_factory):
    """A working directory as after fetch_model.py: Madry's TF1 checkpoint (width 1) with
    its `checkpoint` state file in models/adv_trained, tiny data, a config naming both."""
    root = tmp_path_factory.mktemp("tf1_scripts")
    images, _ = write_madry_cifar(root / "cifar10_data")
    write_madry_tf1_checkpoint(root / "models" / "adv_trained", images[:4].astype(np.float32),
                               width=1, step=70000)
    write_config(root, model_dir="models/adv_trained", data_path="cifar10_data",
                 store_adv_path="attack.npy")
    return root


@pytest.mark.slow
def test_scripts_run_unchanged_on_madry_tf1_checkpoint(tf1_workdir):
    root = tf1_workdir
    evaluated = run_script("eval.py", root, "--once")
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"^Checkpoint \S*models/adv_trained/checkpoint-70000, evaluating \.\.\.",
                     evaluated.stdout, re.M)
    adv = re.search(r"^adversarial: (\d+\.\d\d)%$", evaluated.stdout, re.M).group(1)
    [record] = [json.loads(s) for s in open(root / "models/adv_trained/eval/metrics.jsonl")]
    assert record["step"] == 70000

    attacked = run_script("pgd_attack.py", root)
    assert attacked.returncode == 0, attacked.stderr
    assert attacked.stdout.splitlines() == [
        "Iterating over 3 batches", "batch size: 4", "batch size: 4", "batch size: 2",
        "Storing examples", "Examples stored in attack.npy"]

    scored = run_script("run_attack.py", root)
    assert scored.returncode == 0, scored.stderr
    # Same attack, same seeds: run_attack scores exactly eval.py's adversarial accuracy.
    assert scored.stdout.splitlines() == [f"Accuracy: {adv}%", "Output saved at pred.npy"]
    pred = np.load(root / "pred.npy")
    assert pred.dtype == np.int64 and pred.shape == (10,)


def test_script_refusals_exit_nonzero_without_outputs(tf1_workdir, tmp_path):
    root = tf1_workdir
    x = np.zeros((10, 32, 32, 3))
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan_attack.npy", x)
    write_config(tmp_path, model_dir=str(root / "models" / "adv_trained"),
                 data_path=str(root / "cifar10_data"),
                 store_adv_path=str(tmp_path / "nan_attack.npy"))
    refused = run_script("run_attack.py", tmp_path)
    assert refused.returncode == 2
    assert refused.stdout == "" and "error: Invalid pixel values: found 1 NaN" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "pred.npy").exists()

    write_config(tmp_path, model_dir=str(tmp_path / "no_model"),
                 store_adv_path=str(tmp_path / "attack.npy"))
    no_model = run_script("pgd_attack.py", tmp_path)
    assert no_model.returncode == 2
    assert "error: No model found" in no_model.stderr and "Traceback" not in no_model.stderr
    assert not (tmp_path / "attack.npy").exists()
