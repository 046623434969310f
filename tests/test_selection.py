"""Best-checkpoint selection (`select_best`): the held-out split, the choice of the best step
(ties), best/ and selection.json after kills and on resume, the labels, config errors, and one
tiny training on digits whose best/ eval.py's code loads and scores as recorded."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from madry_ns import checkpoints, data, evaluation, selection, training
from madry_ns.errors import ConfigError
from madry_ns.models import build_model


def _fake(accuracies):
    """An `evaluate` returning the given adversarial accuracies in turn."""
    values = iter(accuracies)

    def evaluate(model):
        del model
        acc = next(values)
        return {"adversarial_accuracy": acc, "natural_accuracy": acc + 0.25,
                "avg_adv_loss": 1.0, "avg_nat_loss": 0.5}

    return evaluate


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_config):
    """One tiny model and optimizer, shared by the selector tests (each has its own dir)."""
    config = tiny_config(tmp_path_factory.mktemp("net"))
    model = build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    return model, optimizer, build_model(config)  # the third loads what the first saved


def _marker(model):
    return model.trainable_variables[0]


def _selector(config, net, digits, accuracies, out=None):
    model, optimizer, _ = net
    _, selection_data, held = selection.split(config, digits)
    return selection.Selector(config, model, optimizer, selection_data, held,
                              out=out or (lambda *_: None), evaluate=_fake(accuracies))


def _best_files(config):
    return sorted(os.path.basename(p) for p in
                  glob.glob(os.path.join(config.model_dir, "best", "checkpoint-*")))


def _record(config):
    with open(os.path.join(config.model_dir, "best", "selection.json")) as f:
        return json.load(f)


def test_heldout_images_never_reach_the_training_stream_and_repeat_on_a_rerun(
        tiny_config, tmp_path, digits):
    config = tiny_config(tmp_path, select_best="heldout", select_examples=40)
    train, chosen, held = selection.split(config, digits)
    again = selection.split(config, digits)[2]
    np.testing.assert_array_equal(held, again)
    assert len(held) == len(set(held.tolist())) == 40
    other = selection.split(config.replace(np_random_seed=1), digits)[2]
    assert not np.array_equal(held, other)  # a draw of the seed, not the first 40 images
    keep = np.setdiff1d(np.arange(len(digits.train_images)), held)
    assert len(train.train_images) == len(digits.train_images) - 40
    np.testing.assert_array_equal(train.train_images, digits.train_images[keep])
    np.testing.assert_array_equal(train.train_labels, digits.train_labels[keep])
    np.testing.assert_array_equal(chosen.test_images, digits.train_images[held])
    np.testing.assert_array_equal(chosen.test_labels, digits.train_labels[held])
    np.testing.assert_array_equal(train.test_images, digits.test_images)  # test untouched
    # What train.py's setup feeds the pipeline is the reduced set.
    run = training.setup(config, out=lambda *_: None)
    np.testing.assert_array_equal(run.dataset.train_images, train.train_images)
    assert run.selector is not None and run.selector.data.source.endswith(
        "40 held-out training images")


def test_none_and_test_leave_the_training_set_and_write_nothing_new(tiny_config, tmp_path,
                                                                    digits):
    config = tiny_config(tmp_path)
    assert selection.split(config, digits) == (digits, None, None)
    run = training.setup(config, out=lambda *_: None)
    assert run.selector is None and len(run.dataset.train_images) == 1497
    assert sorted(os.listdir(config.model_dir)) == ["config.json"]
    test = config.replace(select_best="test", select_examples=16)
    assert selection.split(test, digits) == (digits, digits, None)


def test_fake_accuracies_pick_the_best_step_and_a_tie_keeps_the_earlier(tiny_config, tmp_path,
                                                                        net, digits):
    config = tiny_config(tmp_path, select_best="heldout", select_examples=16)
    lines = []
    selector = _selector(config, net, digits, [0.2, 0.5, 0.5, 0.4, 0.5, 0.6], lines.append)
    marker = _marker(net[0])
    for step in (0, 2, 4, 6, 8, 10):
        marker.assign(tf.fill(marker.shape, float(step)))
        selector.measure(step)
        if step == 8:
            assert _best_files(config) == ["checkpoint-2.data-00000-of-00001",
                                           "checkpoint-2.index"]
            best = tf.train.latest_checkpoint(os.path.join(config.model_dir, "best"))
            assert best.endswith(os.path.join("best", "checkpoint-2"))
            assert _record(config)["best_step"] == 2
    record = _record(config)
    assert [m["step"] for m in record["measurements"]] == [0, 2, 4, 6, 8, 10]
    assert [m["adversarial_accuracy"] for m in record["measurements"]] == \
        [0.2, 0.5, 0.5, 0.4, 0.5, 0.6]
    assert record["best_step"] == 10 and record["best_adversarial_accuracy"] == 0.6
    assert record["best_checkpoint"] == os.path.join("best", "checkpoint-10")
    assert record["ties"] == "the earlier step is kept"
    # The best holds the weights of its own step, as every checkpoint does.
    model = net[2]
    checkpoints.load_weights(model, os.path.join(config.model_dir, "best", "checkpoint-10"))
    assert np.all(_marker(model).numpy() == 10.0)
    assert lines[2].startswith("Selection on heldout images at step 4: adversarial 50.00%, "
                               "natural 75.00%; best step 2 (50.00%)")


def test_the_test_variant_says_test_in_every_label(tiny_config, tmp_path, net, digits):
    config = tiny_config(tmp_path, select_best="test", select_examples=16)
    lines = []
    selector = _selector(config, net, digits, [0.5], lines.append)
    selector.measure(0)
    selector.close()
    record = _record(config)
    assert record["label"] == "TEST" and record["select_best"] == "test"
    assert "TEST" in record["selected_on"] and "optimistic" in record["selected_on"]
    assert record["heldout"] is None and record["num_examples"] == 16
    assert "TEST" in lines[0] and "optimistic" in lines[0]
    events = glob.glob(os.path.join(config.model_dir, "best", "events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0])
            for v in e.summary.value}
    assert tags == {"selection/adversarial_accuracy_TEST", "selection/natural_accuracy_TEST"}


@pytest.mark.parametrize("kill", ["before_record", "before_state_file"])
def test_a_kill_while_keeping_a_new_best_leaves_the_previous_one_and_resume_repairs_it(
        tiny_config, tmp_path, net, digits, monkeypatch, kill):
    config = tiny_config(tmp_path, select_best="heldout", select_examples=16)
    best_dir = os.path.join(config.model_dir, "best")
    first = _selector(config, net, digits, [0.3, 0.6])
    first.measure(0)

    def die(*args, **kwargs):
        raise Killed

    if kill == "before_record":
        monkeypatch.setattr(selection.files, "atomic_write_text", die)
    else:
        monkeypatch.setattr(selection.Selector, "_point_state", die)
    with pytest.raises(Killed):
        first.measure(2)
    monkeypatch.undo()
    # The previous best is still the latest of best/, complete and loadable.
    assert tf.train.latest_checkpoint(best_dir) == os.path.join(best_dir, "checkpoint-0")
    checkpoints.load_weights(net[2], os.path.join(best_dir, "checkpoint-0"))
    # The resumed run: selection.json decides, stray files go, nothing measured is redone.
    resumed = _selector(config, net, digits, [0.6])
    record = _record(config)
    if kill == "before_record":
        assert [m["step"] for m in record["measurements"]] == [0]
        assert _best_files(config) == ["checkpoint-0.data-00000-of-00001",
                                       "checkpoint-0.index"]
        assert not resumed.pending(0) and resumed.pending(2)
        resumed.measure(2)
    else:
        assert [m["step"] for m in record["measurements"]] == [0, 2]
        assert not resumed.pending(2)
    assert _record(config)["best_step"] == 2
    assert tf.train.latest_checkpoint(best_dir) == os.path.join(best_dir, "checkpoint-2")
    assert _best_files(config) == ["checkpoint-2.data-00000-of-00001", "checkpoint-2.index"]


def test_config_errors_name_the_key(tiny_config, tmp_path, net, digits):
    with pytest.raises(ConfigError, match="select_examples 50 is used only with select_best"):
        tiny_config(tmp_path, select_examples=50)
    with pytest.raises(ConfigError, match="select_num_steps 5 is used only with select_best"):
        tiny_config(tmp_path, select_num_steps=5)
    with pytest.raises(ConfigError, match="key 'select_best' has value \"best\", expected one "
                       "of 'none', 'heldout', 'test'"):
        tiny_config(tmp_path, select_best="best")
    with pytest.raises(ConfigError, match="key 'select_examples' has value 0"):
        tiny_config(tmp_path, select_best="test", select_examples=0)
    with pytest.raises(ConfigError, match="select_best 'heldout' is not supported with "
                       "distribution 'multi_worker'"):
        tiny_config(tmp_path, select_best="heldout", distribution="multi_worker")
    with pytest.raises(ConfigError, match=r"select_examples 1490 with select_best 'heldout' "
                       r"leaves 7 of the 1497 training images .* training_batch_size 8"):
        selection.split(tiny_config(tmp_path, select_best="heldout", select_examples=1490),
                        digits)
    with pytest.raises(ConfigError, match="select_examples 301 with select_best 'test' exceeds "
                       "the 300 test images"):
        selection.split(tiny_config(tmp_path, select_best="test", select_examples=301), digits)
    # A resumed run keeps its selection keys (a change would alter the training set) ...
    plain = tiny_config(tmp_path)
    os.makedirs(plain.model_dir, exist_ok=True)
    with open(os.path.join(plain.model_dir, "config.json"), "w") as f:
        f.write(plain.to_json())
    with pytest.raises(ConfigError, match="key 'select_best' is \"heldout\", but the run in .* "
                       "being resumed used \"none\""):
        selection.check_resume(plain.replace(select_best="heldout"))
    selection.check_resume(plain)
    # ... and selection.json its settings.
    config = tiny_config(tmp_path / "b", select_best="heldout", select_examples=16)
    _selector(config, net, digits, [0.1]).measure(0)
    with pytest.raises(ConfigError, match="selection.json was made with attack .PGD-20.*this "
                       "run.s is .PGD-3"):
        _selector(config.replace(select_num_steps=3), net, digits, [])


def test_fit_refuses_selection(tiny_config, tmp_path, net):
    from madry_ns import fit

    with pytest.raises(ConfigError, match="key 'select_best' has value 'heldout', but "
                       "AdversarialTrainer"):
        fit.AdversarialTrainer(net[0], tiny_config(tmp_path, select_best="heldout",
                                                   select_examples=16))


class Killed(BaseException):
    """A stand-in for kill -9 at a chosen moment."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    """A one-step digits training with held-out selection, killed after writing its final
    checkpoint and before measuring it, then run again twice: the second run measures the
    missing step at start (the model holds it), the third measures nothing."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(root, model="resnet20", training_method="natural",
                         select_best="heldout", select_examples=8, select_num_steps=1,
                         num_steps=1, max_num_training_steps=1, num_checkpoint_steps=1,
                         num_output_steps=100, num_summary_steps=100, max_to_keep=0)
    lines = []
    measure = selection.Selector.measure

    def killed_at_step_1(self, step):
        if step == 1:
            raise Killed
        return measure(self, step)

    selection.Selector.measure = killed_at_step_1
    try:
        with pytest.raises(Killed):
            training.train(config, out=lines.append)
    finally:
        selection.Selector.measure = measure
    records = [_record(config)]
    for _ in range(2):
        training.train(config, out=lines.append)
        records.append(_record(config))
    return config, records, lines


def test_training_measures_every_checkpoint_and_a_resume_redoes_none(trained):
    config, (killed, resumed, again), lines = trained
    assert tf.train.latest_checkpoint(config.model_dir).endswith("checkpoint-1")
    assert [m["step"] for m in killed["measurements"]] == [0]
    assert [m["step"] for m in resumed["measurements"]] == [0, 1]
    assert resumed["measurements"][0] == killed["measurements"][0]  # same seconds: not redone
    assert again == resumed
    assert sum(line.startswith("Selection on heldout images") for line in lines) == 2
    assert resumed["label"] == "heldout" and len(resumed["heldout"]["indices"]) == 8
    assert resumed["attack"].startswith("PGD-1 (xent, eps 8, step 4, random start)")


def test_best_loads_with_evals_code_equals_its_step_and_scores_as_recorded(trained, digits,
                                                                          tmp_path):
    config, records, _ = trained
    record = records[-1]
    step = record["best_step"]
    best = checkpoints.latest_checkpoint(os.path.join(config.model_dir, "best"))
    assert best == os.path.join(config.model_dir, "best", f"checkpoint-{step}")
    saved = tf.train.load_checkpoint(best)
    same = tf.train.load_checkpoint(os.path.join(config.model_dir, f"checkpoint-{step}"))
    keys = [k for k, _ in tf.train.list_variables(best) if k.startswith(("model/", "optim"))]
    assert keys
    for key in keys:
        np.testing.assert_array_equal(saved.get_tensor(key), same.get_tensor(key), err_msg=key)
    assert checkpoints.load_model(os.path.join(config.model_dir, "best")) is not None
    # eval.py's path (evaluate_checkpoint) on the held-out images gives the recorded number.
    _, chosen, _ = selection.split(config, digits)
    eval_config = config.replace(model_dir=str(tmp_path), num_eval_examples=8, num_steps=1)
    result = evaluation.evaluate_checkpoint(eval_config, best, build_model(config), chosen,
                                            out=lambda *_: None)
    assert result["adversarial_accuracy"] == record["best_adversarial_accuracy"]
    assert result["natural_accuracy"] == record["best_natural_accuracy"]


def test_measuring_an_rna_model_puts_its_training_path_back(tiny_config, tmp_path, digits):
    """eval.py's classifier draws random paths; the selection then puts the training's
    active path back, so a run with selection trains as one without. (An evaluation that
    draws paths stands in for the real one, whose RNA trace is slow.)"""
    config = tiny_config(tmp_path, model="resnet20", norm_layer="rna", select_best="test",
                         select_examples=8, select_num_steps=1)
    model = build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    model.resample(tf.constant([3, 4], tf.int64))
    path = model.path().numpy()
    weights = [w.numpy() for w in model.weights]
    drawn = []

    def evaluate(m):
        m.resample(tf.constant([5, 6], tf.int64))
        m(tf.zeros([2, 32, 32, 3]), bn_mode="population")
        drawn.append(m.path().numpy())
        return _fake([0.5])(m)

    _, chosen, _ = selection.split(config, digits)
    selector = selection.Selector(config, model, optimizer, chosen, None, out=lambda *_: None,
                                  evaluate=evaluate)
    selector.measure(0)
    assert not np.array_equal(drawn[0], path)
    np.testing.assert_array_equal(model.path().numpy(), path)
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    record = _record(config)
    assert "a fresh random path for every classified batch" in record["inference"]
    assert record["label"] == "TEST"
