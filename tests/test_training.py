"""Training: TF1 momentum and the learning-rate schedule by hand, weight decay on exactly the
kernels, the train step's attack and BN modes, and `train()` end to end: Madry's files,
console lines and summaries, and resume == uninterrupted."""

from __future__ import annotations

import glob
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format

from madry_ns import config as config_lib
from madry_ns import training
from madry_ns.models import MadryWRN

# ----------------------------------------------------------------------------------------
# Optimizer and schedule


def _tf1_momentum_by_hand(w0, grads, lr_at, m):
    w, accum = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    for step, g in enumerate(grads):
        accum = m * accum + g
        w = w - lr_at(step) * accum
    return w


def _keras_sgd_by_hand(w0, grads, lr_at, m):
    w, v = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    for step, g in enumerate(grads):
        v = m * v - lr_at(step) * g
        w = w + v
    return w


def _apply(optimizer, w0, grads):
    w = tf.Variable(w0)
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g, tf.float32), w)])
    return w.numpy()


def test_tf1_momentum_matches_hand_computation_across_a_learning_rate_drop():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=5).astype(np.float32)
    grads = rng.normal(size=(8, 5)).astype(np.float32)
    schedule = [[0, 0.1], [3, 0.01]]
    lr_at = lambda step: 0.1 if step <= 3 else 0.01  # noqa: E731  pre-increment step
    for steps in range(1, 9):
        ours = _apply(training.TF1Momentum(training.learning_rate_schedule(schedule), 0.9),
                      w0, grads[:steps])
        np.testing.assert_allclose(ours, _tf1_momentum_by_hand(w0, grads[:steps], lr_at, 0.9),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{steps} steps")


def test_tf1_momentum_differs_from_keras_sgd_only_after_the_drop():
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=5).astype(np.float32)
    grads = rng.normal(size=(8, 5)).astype(np.float32)
    schedule = [[0, 0.1], [3, 0.01]]
    lr_at = lambda step: 0.1 if step <= 3 else 0.01  # noqa: E731

    def run(make, steps):
        return _apply(make(training.learning_rate_schedule(schedule)), w0, grads[:steps])

    tf1 = lambda lr: training.TF1Momentum(lr, 0.9)  # noqa: E731
    sgd = lambda lr: keras.optimizers.SGD(lr, momentum=0.9)  # noqa: E731
    for steps in (1, 4):  # constant learning rate so far: the two rules agree
        np.testing.assert_allclose(run(tf1, steps), run(sgd, steps), rtol=1e-5, atol=1e-6)
    after_tf1, after_sgd = run(tf1, 8), run(sgd, 8)
    np.testing.assert_allclose(after_sgd, _keras_sgd_by_hand(w0, grads, lr_at, 0.9),
                               rtol=1e-5, atol=1e-6)
    # TF1 keeps the old momentum at full size after the drop; Keras' SGD had it pre-scaled by
    # the old rate. The hand computations predict the gap, and the optimizers show it.
    gap = _tf1_momentum_by_hand(w0, grads, lr_at, 0.9) - _keras_sgd_by_hand(w0, grads, lr_at,
                                                                            0.9)
    assert np.abs(gap).max() > 0.05
    np.testing.assert_allclose(after_tf1 - after_sgd, gap, rtol=1e-3, atol=1e-5)


def test_learning_rate_boundaries_follow_tf1_piecewise_constant():
    sched = training.learning_rate_schedule([[0, 0.1], [40000, 0.01], [60000, 0.001]])
    for step, lr in [(0, 0.1), (39999, 0.1), (40000, 0.1), (40001, 0.01), (60000, 0.01),
                     (60001, 0.001), (80000, 0.001)]:
        assert float(sched(step)) == pytest.approx(lr, rel=1e-7), step
    assert training.learning_rate_schedule([[0, 0.05]]) == 0.05


def test_make_optimizer_uses_the_config():
    config = config_lib.from_dict({"momentum": 0.5, "step_size_schedule": [[0, 0.2], [1, 0.1]]})
    optimizer = training.make_optimizer(config)
    assert isinstance(optimizer, training.TF1Momentum) and optimizer.momentum == 0.5
    w = tf.Variable([1.0])
    optimizer.apply_gradients([(tf.constant([1.0]), w)])   # step 0: lr 0.2, accum 1
    optimizer.apply_gradients([(tf.constant([1.0]), w)])   # step 1: lr 0.2, accum 1.5
    optimizer.apply_gradients([(tf.constant([1.0]), w)])   # step 2: lr 0.1, accum 1.75
    assert w.numpy()[0] == pytest.approx(1.0 - 0.2 - 0.3 - 0.175, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Weight decay and the train step


@pytest.fixture(scope="module")
def wrn():
    keras.utils.set_random_seed(0)
    return MadryWRN(width=1).build_for_input()


def test_weight_decay_loss_is_half_the_squared_norm_of_exactly_the_kernels(wrn):
    # Madry's _decay(): tf.nn.l2_loss over the variables whose name contains 'DW'.
    kernels = [v.numpy().astype(np.float64) for n, v in wrn.tf1_variables().items()
               if "DW" in n]
    assert len(kernels) == 32
    want = sum((k ** 2).sum() / 2 for k in kernels)
    assert float(training.weight_decay_loss(wrn)) == pytest.approx(want, rel=1e-5)
    # Changing a BN scale or the dense bias leaves it unchanged; a kernel does not.
    before = float(training.weight_decay_loss(wrn))
    wrn.unit_1_0.bn1.gamma.assign_add(tf.ones_like(wrn.unit_1_0.bn1.gamma))
    wrn.logit.bias.assign_add(tf.ones_like(wrn.logit.bias))
    assert float(training.weight_decay_loss(wrn)) == before
    wrn.unit_1_0.bn1.gamma.assign_sub(tf.ones_like(wrn.unit_1_0.bn1.gamma))
    wrn.logit.bias.assign_sub(tf.ones_like(wrn.logit.bias))


def _clone(model):
    keras.utils.set_random_seed(99)
    twin = MadryWRN(width=model.width).build_for_input()
    for a, b in zip(twin.variables, model.variables):
        a.assign(b)
    return twin


def _moving_stats(model):
    return [np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])
            for layer in model.bn_layers()]


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    return tf.constant(x), tf.constant(rng.integers(0, 10, n), tf.int64)


def _step_config(tmp_path, tiny_config, **overrides):
    values = dict(momentum=0.0, step_size_schedule=[[0, 0.1]], weight_decay=0.1,
                  training_batch_size=8, num_steps=2, epsilon=8.0, step_size=4.0)
    values.update(overrides)
    return tiny_config(tmp_path, **values)


def _one_step(config, model, x, y, step=0):
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    train_step = training.make_train_step(model, optimizer, config)
    return train_step(x, y, tf.constant(step, tf.int64))


def test_natural_step_trains_on_the_clean_batch_with_decay_on_kernels_only(
        wrn, tmp_path, tiny_config):
    config = _step_config(tmp_path, tiny_config, training_method="natural")
    model = _clone(wrn)
    reference = _clone(wrn)
    x, y = _batch()
    metrics = _one_step(config, model, x, y)
    np.testing.assert_array_equal(metrics["x_adv"].numpy(), x.numpy())

    # The update, by hand: momentum 0, so w1 = w0 - lr * (d mean_xent / dw + wd * w0 [kernels]).
    with tf.GradientTape() as tape:
        logits = reference(x, bn_mode="batch_frozen")  # same forward, no stats update
        xent = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    names = list(reference.tf1_variables())
    ref_vars = [reference.tf1_variables()[n] for n in names]
    grads = dict(zip(names, tape.gradient(xent, ref_vars)))
    updated = model.tf1_variables()
    checked = 0
    for name in names:
        if "moving" in name:
            continue
        w0 = reference.tf1_variables()[name].numpy()
        decay = 0.1 * w0 if "DW" in name else 0.0
        want = w0 - 0.1 * (grads[name].numpy() + decay)
        np.testing.assert_allclose(updated[name].numpy(), want, rtol=1e-4, atol=2e-6,
                                   err_msg=name)
        checked += 1
    assert checked == 32 + 31 * 2 + 1
    # The training forward ran in batch_update: exactly one moving-average update.
    reference(x, bn_mode="batch_update")
    for a, b in zip(_moving_stats(model), _moving_stats(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_madry_step_attack_in_batch_frozen_leaves_moving_stats_to_the_update(
        wrn, tmp_path, tiny_config):
    config = _step_config(tmp_path, tiny_config, train_attack_bn_mode="batch_frozen")
    model, reference = _clone(wrn), _clone(wrn)
    x, y = _batch(1)
    metrics = _one_step(config, model, x, y, step=3)
    x_adv = metrics["x_adv"].numpy()
    assert 0 < np.abs(x_adv - x.numpy()).max() <= 8.0
    assert x_adv.min() >= 0 and x_adv.max() <= 255
    # One update, from the adversarial batch only: the attack's 2 forwards changed nothing.
    reference(tf.constant(x_adv), bn_mode="batch_update")
    for a, b in zip(_moving_stats(model), _moving_stats(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Adversarial accuracy and cross-entropy describe the update's forward on x_adv.
    logits = _clone(wrn)(tf.constant(x_adv), bn_mode="batch_frozen")
    np.testing.assert_allclose(float(metrics["xent"]), float(tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))), rtol=1e-4)


def test_madry_step_attack_in_batch_update_updates_moving_stats_at_every_attack_step(
        wrn, tmp_path, tiny_config):
    # Madry's train-mode attack: num_steps (2) attack forwards + 1 training forward, each
    # nudging the moving averages: m_k = 0.9^k m_0 + (1 - 0.9^k) * (batch means), k = 3.
    config = _step_config(tmp_path, tiny_config, train_attack_bn_mode="batch_update")
    model, once = _clone(wrn), _clone(wrn)
    x, y = _batch(2)
    initial = _moving_stats(model)
    metrics = _one_step(config, model, x, y)
    once(metrics["x_adv"], bn_mode="batch_update")
    first_mean = [s[:len(s) // 2] for s in _moving_stats(model)][0]
    one_update = [s[:len(s) // 2] for s in _moving_stats(once)][0]
    # First BN layer (after init_conv, whose input barely moves within eps): its moving
    # mean starts at 0, so after k updates it is (1 - 0.9^k) * batch mean.
    ratio = np.abs(first_mean).sum() / np.abs(one_update).sum()
    assert ratio == pytest.approx((1 - 0.9 ** 3) / (1 - 0.9), rel=0.05)
    assert all(not np.allclose(a, b) for a, b in zip(_moving_stats(model), initial))


# ----------------------------------------------------------------------------------------
# train(): files, console lines, summaries, resume

STEP_LINE = re.compile(r"^Step (\d+):    \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\)$")
ACC_LINE = re.compile(r"^    training (nat|adv) accuracy (\d{1,3}(\.\d{1,3})?)%$")
SPEED_LINE = re.compile(r"^    (\d+\.\d+(e[-+]\d+)?) examples per second$")
MAX_STEPS = 6


class Interrupt(Exception):
    pass


def _run_config(model_dir, data_path, **overrides):
    values = dict(model_dir=str(model_dir), data_path=data_path, dataset="cifar10",
                  model="resnet20", training_batch_size=8, max_num_training_steps=MAX_STEPS,
                  num_output_steps=1, num_summary_steps=2, num_checkpoint_steps=2,
                  step_size_schedule=[[0, 0.1], [2, 0.01]], num_steps=2, step_size=4.0)
    values.update(overrides)
    return config_lib.from_dict(values)


def _train(config, stop_at=None):
    lines = []

    def out(line):
        if stop_at is not None and line.startswith(f"Step {stop_at}:"):
            raise Interrupt  # the process dies after step `stop_at` trained, before saving
        lines.append(line)

    try:
        final = training.train(config, out=out)
    except Interrupt:
        final = None
    return final, lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory, madry_pickles):
    """Three runs on the same Madry-format pickles (20 training images, 8 per batch):
    `full` 0..6 in one go; `split` 0..3 then resumed to 6; `crashed` killed after step 3
    (latest checkpoint 2), then resumed to 6."""
    root = tmp_path_factory.mktemp("runs")
    data_path = madry_pickles(root, n_train_per_batch=4, n_test=8)["data_path"]
    result = {}
    config = _run_config(root / "full", data_path, save_keras=True)
    result["full"] = (config, *_train(config))

    first = _run_config(root / "split", data_path, max_num_training_steps=3)
    result["split_first"] = (first, *_train(first))
    result["split_after_first"] = _checkpoint_files(first.model_dir)
    second = _run_config(root / "split", data_path)
    result["split"] = (second, *_train(second))

    crashed = _run_config(root / "crashed", data_path)
    result["crashed_first"] = (crashed, *_train(crashed, stop_at=3))
    result["crashed_after_first"] = _checkpoint_files(crashed.model_dir)
    result["crashed_after_first_latest"] = tf.train.latest_checkpoint(crashed.model_dir)
    result["crashed_zero"] = _read_checkpoint(os.path.join(crashed.model_dir, "checkpoint-0"))
    result["crashed"] = (crashed, *_train(crashed))
    return result


def _checkpoint_files(model_dir):
    return sorted(int(m.group(1)) for f in os.listdir(model_dir)
                  if (m := re.fullmatch(r"checkpoint-(\d+)\.index", f)))


def _read_checkpoint(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("save_counter") and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _iterations(state):
    return int(state["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"])


def test_train_writes_madrys_checkpoints_and_keeps_three(runs):
    config, final, _ = runs["full"]
    assert final == os.path.join(config.model_dir, "checkpoint-6")
    # Written: 0, 2, 4 (every num_checkpoint_steps) and the final 6; the 3 newest are kept.
    assert _checkpoint_files(config.model_dir) == [2, 4, 6]
    assert tf.train.latest_checkpoint(config.model_dir) == final
    state = tf.train.get_checkpoint_state(config.model_dir)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # checkpoint-N holds the state after N updates (checkpoint-0: untrained).
    for n in (2, 4, 6):
        assert _iterations(_read_checkpoint(os.path.join(config.model_dir,
                                                         f"checkpoint-{n}"))) == n
    assert _iterations(runs["crashed_zero"]) == 0


def test_checkpoint_holds_model_optimizer_slots_and_bn_statistics(runs):
    from madry_ns import checkpoints
    from madry_ns.models import build_model

    config, final, _ = runs["full"]
    state = _read_checkpoint(final)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    # Each variable is stored once: trainable ones under the optimizer's reference to them.
    stored = [k for k in state if k.startswith(("model/", "optimizer/_trainable_variables/"))]
    assert len(stored) == len(model.variables)
    moving = [k for k in state if k.startswith("model/") and "/moving_" in k]
    assert len(moving) == 2 * len(model.bn_layers())
    # TF1Momentum's accumulators, one per trainable variable, shaped like it.
    slots = sorted(tuple(state[k].shape) for k in state if k.startswith("optimizer/_variables/")
                   and state[k].ndim > 0)
    assert slots == sorted(tuple(v.shape) for v in model.trainable_variables)
    # Restoring into a fresh model sets every variable, moving statistics included.
    fresh = [v.numpy().copy() for v in model.variables]
    checkpoints.load_weights(model, final)
    for before, var in zip(fresh, model.variables):
        assert not np.array_equal(before, var.numpy()), var.path


def test_train_copies_the_resolved_config_atomically(runs):
    config, _, _ = runs["full"]
    path = os.path.join(config.model_dir, "config.json")
    assert config_lib.load(path) == config
    with open(path) as f:
        assert json.load(f) == config.to_dict()
    assert not [f for f in os.listdir(config.model_dir) if f.endswith(".tmp")]


def test_console_lines_are_madrys(runs):
    config, _, lines = runs["full"]
    reports = [lines[i:i + 4] for i, line in enumerate(lines) if line.startswith("Step ")]
    assert [int(STEP_LINE.match(r[0]).group(1)) for r in reports] == list(range(MAX_STEPS))
    for i, report in enumerate(reports):
        nat, adv = ACC_LINE.match(report[1]), ACC_LINE.match(report[2])
        assert nat.group(1) == "nat" and adv.group(1) == "adv"
        for match in (nat, adv):
            value = float(match.group(2))
            # An accuracy on a batch of 8, printed with Python's {:.4}.
            assert value * 8 / 100 == pytest.approx(round(value * 8 / 100), abs=1e-3)
            assert f"{value:.4}" == match.group(2)
        if i == 0:
            assert len(report) < 4 or not SPEED_LINE.match(report[3])
        else:
            assert float(SPEED_LINE.match(report[3]).group(1)) > 0
    assert len(lines) == 4 * MAX_STEPS - 1


def _events(model_dir):
    files = glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))
    assert files, "no event file in model_dir"
    events = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.setdefault(value.tag, {})[event.step] = value
    return events


def test_summaries_use_madrys_tags_and_scaled_images(runs):
    config, _, _ = runs["full"]
    events = _events(config.model_dir)
    for tag in ["accuracy_adv_train", "accuracy_adv", "xent_adv_train", "xent_adv",
                "images_adv_train"]:
        assert sorted(events[tag]) == [0, 2, 4], tag
    scalar = lambda tag, step: float(tf.make_ndarray(events[tag][step].tensor))  # noqa: E731
    for step in (0, 2, 4):
        acc = scalar("accuracy_adv_train", step)
        assert acc == scalar("accuracy_adv", step) and acc * 8 == round(acc * 8)
        assert scalar("xent_adv_train", step) == scalar("xent_adv", step) > 0
        # The learning rate of the update made at this step (boundary 2: 0.1 up to step 2).
        assert scalar("learning_rate", step) == pytest.approx(0.1 if step <= 2 else 0.01)
        images = tf.make_ndarray(events["images_adv_train"][step].tensor)
        assert images[:2].tolist() == [b"32", b"32"] and len(images) == 2 + 3
        for png in images[2:]:
            pixels = tf.io.decode_png(png).numpy()
            assert pixels.shape == (32, 32, 3)
            # Scaled to [0, 1] before encoding: a full range of levels survives. Unscaled
            # 0-255 floats would saturate to 255 nearly everywhere.
            assert len(np.unique(pixels)) > 100 and np.mean(pixels == 255) < 0.1


def test_the_config_is_written_as_tensorboard_hparams(runs):
    """The HParams plugin's summaries in model_dir: every config key with its value (lists
    and null as JSON), and Madry's training scalars and eval.py's accuracies as metrics."""
    from tensorboard.plugins.hparams import metadata

    config, _, _ = runs["full"]
    events = _events(config.model_dir)
    start = metadata.parse_session_start_info_plugin_data(
        events[metadata.SESSION_START_INFO_TAG][0].metadata.plugin_data.content)
    written = {key: json_format.MessageToDict(value) for key, value in start.hparams.items()}
    expected = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                for key, value in config.to_dict().items()}
    assert written == expected
    assert (written["epsilon"], written["save_keras"]) == (8.0, True)
    assert written["step_size_schedule"] == "[[0, 0.1], [2, 0.01]]"
    experiment = metadata.parse_experiment_plugin_data(
        events[metadata.EXPERIMENT_TAG][0].metadata.plugin_data.content)
    assert [h.name for h in experiment.hparam_infos] == list(expected)
    assert {(m.name.tag, m.name.group) for m in experiment.metric_infos} == {
        ("accuracy_adv_train", ""), ("xent_adv_train", ""), ("loss_total", ""),
        ("accuracy nat", "eval"), ("accuracy adv eval", "eval")}


def test_save_keras_writes_the_final_model_that_load_model_reads_back(runs):
    import madry_ns
    from madry_ns import checkpoints
    from madry_ns.models import build_model

    config, final, _ = runs["full"]
    path = os.path.join(config.model_dir, "model.keras")
    loaded = madry_ns.load_model(path)
    trained = build_model(config)
    checkpoints.load_weights(trained, final)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)), tf.float32)
    for mode in ("population", "batch_frozen"):
        np.testing.assert_array_equal(loaded(x, bn_mode=mode).numpy(),
                                      trained(x, bn_mode=mode).numpy(), err_msg=mode)
    assert not [f for f in os.listdir(config.model_dir) if f.startswith(".model.keras")]
    assert not os.path.exists(os.path.join(runs["split"][0].model_dir, "model.keras"))


def test_resume_after_the_final_checkpoint_equals_uninterrupted(runs):
    config, final, _ = runs["full"]
    first_config, first_final, first_lines = runs["split_first"]
    assert first_final.endswith("checkpoint-3") and runs["split_after_first"] == [0, 2, 3]
    split_config, split_final, lines = runs["split"]
    assert lines[0] == f"Resuming from {first_final} at step 3"
    # No step is trained twice: the resumed run reports steps 3, 4, 5 only.
    assert [int(m.group(1)) for line in lines if (m := STEP_LINE.match(line))] == [3, 4, 5]
    _assert_same_state(_read_checkpoint(final), _read_checkpoint(split_final))


def test_resume_after_a_crash_between_checkpoints_equals_uninterrupted(runs):
    config, final, _ = runs["full"]
    _, crashed_final, first_lines = runs["crashed_first"]
    assert crashed_final is None
    assert [int(m.group(1)) for line in first_lines if (m := STEP_LINE.match(line))] == \
        [0, 1, 2]
    assert runs["crashed_after_first"] == [0, 2]
    latest = runs["crashed_after_first_latest"]
    assert latest.endswith("checkpoint-2")
    _, resumed_final, lines = runs["crashed"]
    assert lines[0] == f"Resuming from {latest} at step 2"
    assert [int(m.group(1)) for line in lines if (m := STEP_LINE.match(line))] == [2, 3, 4, 5]
    _assert_same_state(_read_checkpoint(final), _read_checkpoint(resumed_final))


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    assert _iterations(a) == _iterations(b) == MAX_STEPS
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any("moving_variance" in k for k in a)
    assert any(k.startswith("optimizer/_variables/") for k in a)


def test_training_again_after_the_last_step_changes_nothing(runs, tmp_path):
    config, final, _ = runs["full"]
    before = _read_checkpoint(final)
    again, lines = _train(config)
    assert again == final and lines == [f"Resuming from {final} at step {MAX_STEPS}"]
    _assert_same_state(before, _read_checkpoint(final))


def test_setup_loop_and_report_by_hand_equal_train(tmp_path, tiny_config):
    """`train()` is setup + run_loop + TrainingReport; the attack is built once in setup
    and is the one the step calls."""
    config = tiny_config(tmp_path / "a", max_num_training_steps=2)
    final = training.train(config, out=lambda line: None)
    by_hand = config.replace(model_dir=str(tmp_path / "b" / "model"))
    run = training.setup(by_hand, out=lambda line: None)
    assert isinstance(run.attack, training.TrainingAttack)
    assert run.train_step.adversary is run.attack
    path = training.run_loop(run, training.TrainingReport(run))
    a, b = tf.train.load_checkpoint(final), tf.train.load_checkpoint(path)
    keys = [k for k in a.get_variable_to_shape_map() if not k.startswith("_CHECKPOINTABLE")]
    assert keys and sorted(keys) == sorted(k for k in b.get_variable_to_shape_map()
                                           if not k.startswith("_CHECKPOINTABLE"))
    for key in keys:
        np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=key)


@pytest.mark.parametrize("max_to_keep, kept", [(1, [3]), (0, [0, 1, 2, 3])])
def test_max_to_keep_keeps_the_newest_checkpoints_or_all(tmp_path, tiny_config, max_to_keep,
                                                         kept):
    config = tiny_config(tmp_path, training_method="natural", max_num_training_steps=3,
                         num_checkpoint_steps=1, max_to_keep=max_to_keep)
    training.train(config, out=lambda *_: None)
    assert _checkpoint_files(config.model_dir) == kept
    assert tf.train.latest_checkpoint(config.model_dir).endswith("checkpoint-3")
