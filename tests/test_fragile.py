"""Fragile features (madry_ns.finetune, analysis bn, madry_ns.fragile): each training regime
changes exactly its variables, folded BN reproduces the layer, BN-only from scratch keeps
the random features, init_checkpoint and resume, the analysis files, the Table 2 runner."""

from __future__ import annotations

import csv
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import analysis, checkpoints, finetune, fragile, training
from madry_ns import config as config_lib
from madry_ns.errors import ConfigError
from madry_ns.layers import BatchNorm
from madry_ns.models import MadryWRN, ResNet20, build_model

REGIMES = ("all", "bn_stats", "bn_affine", "bn_affine_batch", "bn", "bn+logits+conv1")


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.float32)


def _labels(n, seed=1):
    return np.random.default_rng(seed).integers(0, 10, n).astype(np.int64)


def _config(tmp_path, **overrides):
    from conftest import make_tiny_config

    values = dict(model="resnet20", training_batch_size=8, num_steps=1, step_size=8.0,
                  epsilon=8.0, weight_decay=0.01, train_attack_bn_mode="population")
    values.update(overrides)
    return make_tiny_config(tmp_path, **values)


def _randomize(model, seed=0):
    """BN parameters and statistics away from their initial 1/0/0/1, as a trained model's."""
    rng = np.random.default_rng(seed)
    for bn in model.bn_layers():
        c = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                        rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])


def _key(variable) -> str:
    """'block_1_0/bn1/gamma': the path inside the model (Keras numbers model names)."""
    return variable.path.split("/", 1)[1]


def _snapshot(model) -> dict:
    return {_key(v): v.numpy().copy() for v in model.weights}


def _kinds(model) -> dict:
    """Variable path -> kind: gamma/beta, stats, conv1, logits, kernel (other convs)."""
    kinds = {}
    for bn in model.bn_layers():
        kinds[_key(bn.gamma)] = kinds[_key(bn.beta)] = "affine"
        kinds[_key(bn.moving_mean)] = kinds[_key(bn.moving_variance)] = "stats"
    kinds[_key(model.init_conv.kernel)] = "conv1"
    kinds[_key(model.logit.kernel)] = kinds[_key(model.logit.bias)] = "logits"
    for v in model.weights:
        kinds.setdefault(_key(v), "kernel")
    return kinds


# Which kinds of variable a regime changes in one step.
CHANGES = {
    "all": {"affine", "stats", "conv1", "logits", "kernel"},
    "bn_stats": {"stats"},
    "bn_affine": {"affine"},
    "bn_affine_batch": {"affine"},
    "bn": {"affine", "stats"},
    "bn+logits+conv1": {"affine", "stats", "conv1", "logits"},
}


# ----------------------------------------------------------------------------------------
# Model plumbing


@pytest.mark.parametrize("make", [lambda: ResNet20(width=1), lambda: MadryWRN(width=1)],
                         ids=["resnet20", "madry_wrn"])
def test_bn_layers_are_listed_in_the_order_the_forward_calls_them(make, monkeypatch):
    model = make().build_for_input()
    called = []
    original = BatchNorm.call

    def recording(self, *args, **kwargs):
        called.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchNorm, "call", recording)
    model(tf.constant(_images(2)), bn_mode="population")
    assert called == [id(bn) for bn in model.bn_layers()]


def _resnet20_counts(width):
    """ResNet-20 (option A) parameters by hand: convs, BN gamma/beta, dense."""
    f = [16 * width, 32 * width, 64 * width]
    conv = 9 * 3 * f[0] + 6 * 9 * f[0] * f[0]
    conv += 9 * f[0] * f[1] + 5 * 9 * f[1] * f[1] + 9 * f[1] * f[2] + 5 * 9 * f[2] * f[2]
    bn = 2 * (f[0] + 6 * (f[0] + f[1] + f[2]))
    dense = f[2] * 10 + 10
    return conv + bn + dense, bn, 9 * 3 * f[0] + dense


@pytest.mark.parametrize("width", [1, 4])
def test_parameter_shares_match_a_hand_count(tmp_path, width):
    total, bn, extra = _resnet20_counts(width)
    model = ResNet20(width=width).build_for_input()
    for regime, trainable in [("all", total), ("bn_stats", 0), ("bn_affine", bn), ("bn", bn),
                              ("bn+logits+conv1", bn + extra)]:
        config = _config(tmp_path, trainable=regime, model_width=width)
        counts = finetune.parameter_counts(model, config)
        assert (counts["total"], counts["trainable"], counts["bn_affine"]) == \
            (total, trainable, bn), regime
    # Width 1: 1,376 of 269,722 (0.51%); width 4: 5,504 of 4,286,026 (0.128%).
    assert (total, bn) == {1: (269_722, 1_376), 4: (4_286_026, 5_504)}[width]
    line = finetune.describe(model, _config(tmp_path, trainable="bn", model_width=width))
    assert f"{bn:,} of {total:,} parameters ({100 * bn / total:.3g}%)" in line


def test_decay_covers_only_the_trainable_kernels(tmp_path):
    model = ResNet20(width=1).build_for_input()
    ids = lambda vs: [id(v) for v in vs]  # noqa: E731
    assert ids(finetune.decay_variables(model, _config(tmp_path, trainable="all"))) == \
        ids(model.decay_variables())
    for regime in ("bn_stats", "bn_affine", "bn"):
        assert finetune.decay_variables(model, _config(tmp_path, trainable=regime)) == []
    assert ids(finetune.decay_variables(model, _config(tmp_path, trainable="bn+logits+conv1"))) \
        == ids([model.init_conv.kernel, model.logit.kernel])
    assert float(training.weight_decay_loss(model, [])) == 0.0


# ----------------------------------------------------------------------------------------
# One step of each regime


def _one_step(config, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model(config)
    _randomize(model)
    optimizer = training.make_optimizer(config)
    optimizer.build(finetune.trainable_variables(model, config))
    step = training.make_train_step(model, optimizer, config)
    before = _snapshot(model)
    metrics = step(tf.constant(_images(8)), tf.constant(_labels(8)), tf.constant(0, tf.int64))
    return model, optimizer, before, _snapshot(model), metrics


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("method", ["madry", "natural"])
def test_one_step_changes_exactly_the_regimes_variables(tmp_path, regime, method):
    config = _config(tmp_path, trainable=regime, training_method=method)
    model, optimizer, before, after, metrics = _one_step(config)
    assert bool(metrics["finite"])
    kinds = _kinds(model)
    for path, value in before.items():
        changed = not np.array_equal(value, after[path])
        assert changed == (kinds[path] in CHANGES[regime]), (path, kinds[path])
    assert int(optimizer.iterations) == 1  # the step counts even with nothing to update
    # Optimizer slots exist for the trainable variables only.
    assert len(optimizer.accumulators) == len(finetune.trainable_variables(model, config))


def test_bn_stats_step_is_a_batch_update_forward_of_the_batch(tmp_path):
    config = _config(tmp_path, trainable="bn_stats", training_method="natural")
    model, _, before, after, _ = _one_step(config)
    # Independently: the starting model, one batch_update forward of the same batch.
    for v in model.weights:
        v.assign(before[_key(v)])
    model(tf.constant(_images(8)), bn_mode="batch_update")
    for v in model.weights:  # compiled vs eager: the variance may differ in the last bit
        np.testing.assert_allclose(v.numpy(), after[_key(v)], rtol=2e-7, atol=0,
                                   err_msg=v.path)


def test_bn_affine_step_descends_the_population_mode_loss(tmp_path):
    config = _config(tmp_path, trainable="bn_affine", training_method="natural",
                     step_size_schedule=[[0, 0.1]])
    model, _, before, after, _ = _one_step(config)
    for v in model.weights:
        v.assign(before[_key(v)])
    affine = [v for bn in model.bn_layers() for v in (bn.gamma, bn.beta)]
    with tf.GradientTape() as tape:
        logits = model(tf.constant(_images(8)), bn_mode="population")
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.constant(_labels(8)), logits))
    grads = tape.gradient(loss, affine)
    for v, g in zip(affine, grads):  # TF1 momentum, first step: w - lr * g; no decay
        np.testing.assert_allclose(after[_key(v)], before[_key(v)] - 0.1 * g.numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_bn_affine_batch_step_descends_the_batch_statistics_loss(tmp_path):
    """BN ONLY PARAMS through batch statistics: the step is gamma/beta's gradient of the
    loss under each batch's own statistics (not the population one), and the moving
    statistics do not move."""
    config = _config(tmp_path, trainable="bn_affine_batch", training_method="natural",
                     step_size_schedule=[[0, 0.1]])
    model, _, before, after, _ = _one_step(config)
    for v in model.weights:
        v.assign(before[_key(v)])
    affine = [v for bn in model.bn_layers() for v in (bn.gamma, bn.beta)]
    grads = {}
    for mode in ("batch_frozen", "population"):
        with tf.GradientTape() as tape:
            logits = model(tf.constant(_images(8)), bn_mode=mode)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.constant(_labels(8)), logits))
        grads[mode] = tape.gradient(loss, affine)
    for v, g in zip(affine, grads["batch_frozen"]):
        np.testing.assert_allclose(after[_key(v)], before[_key(v)] - 0.1 * g.numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=v.path)
    # The two readings of BN ONLY PARAMS are different updates.
    assert any(not np.allclose(a.numpy(), b.numpy(), atol=1e-6)
               for a, b in zip(grads["batch_frozen"], grads["population"]))
    for bn in model.bn_layers():
        for v in (bn.moving_mean, bn.moving_variance):
            np.testing.assert_array_equal(after[_key(v)], before[_key(v)], err_msg=v.path)


# ----------------------------------------------------------------------------------------
# Folded BN


def test_folded_m_b_reproduce_a_resnet20_layers_inference_output():
    keras.utils.set_random_seed(4)
    model = ResNet20(width=1).build_for_input()
    _randomize(model, seed=5)
    x = tf.image.per_image_standardization(tf.constant(_images(4)))
    h = tf.nn.relu(model.init_bn(model.init_conv(x), mode="population"))
    for name in model.block_names[:4]:
        h = getattr(model, name)(h, bn_mode="population")
    block = model.block_2_1
    z = block.conv1(h)  # the real input of block_2_1/bn1 (32 channels)
    want = block.bn1(z, mode="population").numpy().astype(np.float64)
    m, b = block.bn1.folded()
    got = z.numpy().astype(np.float64) * m.numpy() + b.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # And the paper's Eq. 1, written out from the variables.
    bn = block.bn1
    np.testing.assert_allclose(m.numpy(), bn.gamma.numpy() / np.sqrt(
        bn.moving_variance.numpy() + bn.epsilon), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), bn.beta.numpy() - bn.gamma.numpy()
                               * bn.moving_mean.numpy()
                               / np.sqrt(bn.moving_variance.numpy() + bn.epsilon),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# train(): BN-only from scratch, init_checkpoint, resume


def _train(config):
    lines = []
    path = training.train(config, out=lines.append)
    return path, lines


def _load(config, path):
    model = build_model(config)
    checkpoints.load_weights(model, path)
    return model


@pytest.mark.parametrize("method", ["natural", "madry"])
def test_bn_only_from_scratch_keeps_convolutions_and_dense_bit_identical(tmp_path, method):
    config = _config(tmp_path, trainable="bn", training_method=method,
                     max_num_training_steps=3)
    path, lines = _train(config)
    training.seed_everything(config)
    fresh = build_model(config)  # the random features train() started from
    trained = _load(config, path)
    kinds = _kinds(trained)
    fresh_values = _snapshot(fresh)
    for v in trained.weights:
        same = np.array_equal(v.numpy(), fresh_values[_key(v)])
        assert same == (kinds[_key(v)] in ("conv1", "logits", "kernel")), _key(v)
    assert any("Trainable (bn): " in line and "(0.51%)" in line for line in lines)


def _normal_run(tmp_path):
    config = _config(tmp_path, model_dir=str(tmp_path / "normal"), training_method="natural",
                     max_num_training_steps=2)
    path, _ = _train(config)
    return config, path


def _restore_run(config, path):
    model = build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(finetune.trainable_variables(model, config))
    checkpoints.restore(tf.train.Checkpoint(model=model, optimizer=optimizer), path)
    return model, optimizer


def test_init_checkpoint_loads_weights_and_statistics_but_starts_at_step_0(tmp_path):
    normal, normal_path = _normal_run(tmp_path)
    normal_model, normal_optimizer = _restore_run(normal, normal_path)
    assert int(normal_optimizer.iterations) == 2
    assert any(np.any(a.numpy()) for a in normal_optimizer.accumulators)
    config = _config(tmp_path, model_dir=str(tmp_path / "ft"), trainable="all",
                     init_checkpoint=str(tmp_path / "normal"), max_num_training_steps=2)
    _, lines = _train(config)
    assert any(line.startswith(f"Initialized from {normal_path}") for line in lines)
    start, optimizer = _restore_run(config, str(tmp_path / "ft" / "checkpoint-0"))
    assert int(optimizer.iterations) == 0
    assert not any(np.any(a.numpy()) for a in optimizer.accumulators)
    for v, w in zip(start.weights, normal_model.weights):
        np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=v.path)
    assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(config.model_dir)) == 2


def test_reset_bn_stats_resets_only_the_statistics(tmp_path):
    normal, normal_path = _normal_run(tmp_path)
    normal_model = _load(normal, normal_path)
    config = _config(tmp_path, model_dir=str(tmp_path / "reset"), trainable="bn_stats",
                     init_checkpoint=normal_path, reset_bn_stats=True, max_num_training_steps=2)
    _, lines = _train(config)
    assert "BN moving statistics reset to mean 0, variance 1" in lines
    start = _load(config, str(tmp_path / "reset" / "checkpoint-0"))
    kinds = _kinds(start)
    for v, w in zip(start.weights, normal_model.weights):
        if kinds[_key(v)] == "stats":
            want = 0.0 if "mean" in v.path else 1.0
            np.testing.assert_array_equal(v.numpy(), np.full(v.shape, want, np.float32))
        else:
            np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=v.path)
    end = _load(config, checkpoints.latest_checkpoint(config.model_dir))
    assert not np.array_equal(end.init_bn.moving_mean.numpy(), np.zeros(16))


@pytest.mark.parametrize("regime", [
    "bn_stats",  # the step counter advances without an optimizer update
    pytest.param("bn_affine", marks=[pytest.mark.slow, pytest.mark.extended]),
    pytest.param("bn+logits+conv1", marks=[pytest.mark.slow, pytest.mark.extended])])
def test_interrupted_fine_tuning_resumes_to_the_uninterrupted_result(tmp_path, regime):
    _, normal_path = _normal_run(tmp_path)

    def config(name, steps):
        return _config(tmp_path, model_dir=str(tmp_path / name), trainable=regime,
                       init_checkpoint=normal_path, max_num_training_steps=steps)

    straight, _ = _train(config("straight", 4))
    _train(config("resumed", 2))
    resumed, lines = _train(config("resumed", 4))
    assert any(line.startswith("Resuming from") for line in lines)
    assert not any(line.startswith("Initialized from") for line in lines)  # own ckpt first
    a, b = _load(config("straight", 4), straight), _load(config("resumed", 4), resumed)
    for v, w in zip(a.weights, b.weights):
        np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=v.path)
    assert glob.glob(str(tmp_path / "resumed" / "events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------
# Config checks


@pytest.mark.parametrize("overrides, message", [
    (dict(trainable="bn_affine", train_attack_bn_mode="batch_update"), "keeps the BN statistics"),
    (dict(reset_bn_stats=True), "init_checkpoint is not set"),
    (dict(trainable="bn_affine", reset_bn_stats=True, init_checkpoint="x"), "freeze the stat"),
    (dict(trainable="bn_affine_batch", train_attack_bn_mode="batch_update"),
     "'bn_affine_batch' keeps the BN statistics"),
    (dict(trainable="bn_affine_batch", reset_bn_stats=True, init_checkpoint="x"),
     "freeze the stat"),
    (dict(trainable="bn_params"), "one of 'all', 'bn_stats', 'bn_affine'"),
])
def test_inconsistent_fine_tuning_configs_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_missing_init_checkpoint_is_a_clear_error(tmp_path):
    config = _config(tmp_path, init_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(checkpoints.CheckpointError, match="not found"):
        training.train(config, out=lambda line: None)


# ----------------------------------------------------------------------------------------
# Analysis


def _save_model_dir(path, model, config):
    os.makedirs(path, exist_ok=True)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    checkpoints.Checkpointer(str(path), model, optimizer).save(7)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.replace(model_dir=str(path)).to_json())


def test_folded_bn_and_the_mean_difference_match_numpy():
    keras.utils.set_random_seed(6)
    a, b = ResNet20(width=1).build_for_input(), ResNet20(width=1).build_for_input()
    _randomize(a, 1)
    _randomize(b, 2)
    layers_a, layers_b = analysis.folded_bn(a), analysis.folded_bn(b)
    assert [l["layer"] for l in layers_a][:3] == ["init_bn", "block_1_0/bn1", "block_1_0/bn2"]

    def m_of(bn):
        return bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)

    for layer, bn in zip(layers_a, a.bn_layers()):
        np.testing.assert_allclose(layer["m"], m_of(bn), rtol=1e-6)
    want = np.mean([m_of(y).mean() - m_of(x).mean() for x, y in zip(a.bn_layers(),
                                                                     b.bn_layers())])
    np.testing.assert_allclose(analysis.mean_m_difference(layers_a, layers_b), want, rtol=1e-5)
    assert analysis.mean_m_difference(layers_a, layers_a) == 0.0


@pytest.mark.slow
def test_analysis_bn_writes_csv_png_and_tensorboard_matching_a_hand_computation(tmp_path):
    config = _config(tmp_path)
    folded = {}
    for label, seed in (("NORMAL", 1), ("BN PARAMS", 2)):
        keras.utils.set_random_seed(seed)
        model = ResNet20(width=1).build_for_input()
        _randomize(model, seed)
        _save_model_dir(tmp_path / label.replace(" ", "_"), model, config)
        folded[label] = [(bn.gamma.numpy().astype(np.float64)
                          / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + 1e-3),
                          bn.beta.numpy().astype(np.float64)
                          - bn.gamma.numpy() * bn.moving_mean.numpy()
                          / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + 1e-3))
                         for bn in model.bn_layers()]
    out = tmp_path / "bn"
    assert analysis.main(["bn", str(tmp_path / "NORMAL"), str(tmp_path / "BN_PARAMS"),
                          "--labels", "NORMAL", "BN PARAMS", "--output", str(out)]) == 0

    with open(out / "bn_layers.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 19
    for row in rows:
        m, b = folded[row["model"]][int(row["layer_index"])]
        m_ref = folded["NORMAL"][int(row["layer_index"])][0]
        np.testing.assert_allclose(float(row["mean_m"]), m.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(row["mean_b"]), b.mean(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(row["negative_m_share"]), (m < 0).mean())
        np.testing.assert_allclose(float(row["mean_m_minus_reference"]),
                                   m.mean() - m_ref.mean(), rtol=1e-5, atol=1e-9)
    assert rows[1]["layer"] == "block_1_0/bn1" and rows[2]["layer"] == "block_1_0/bn2"
    with open(out / "bn_channels.csv", encoding="utf-8") as f:
        channels = list(csv.DictReader(f))
    assert len(channels) == 2 * 688
    first = channels[0]
    np.testing.assert_allclose(float(first["m"]), folded["NORMAL"][0][0][0], rtol=1e-6)

    with open(out / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    want = np.mean([p[0].mean() - n[0].mean()
                    for n, p in zip(folded["NORMAL"], folded["BN PARAMS"])])
    got = summary["models"]["BN PARAMS"]["average_mean_m_difference_to_reference"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert summary["models"]["BN PARAMS"]["layers_with_lower_mean_m_than_reference"] == sum(
        p[0].mean() < n[0].mean() for n, p in zip(folded["NORMAL"], folded["BN PARAMS"]))
    assert summary["models"]["NORMAL"]["step"] == 7

    pngs = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.png")))
    assert pngs == ["hist_layer_%02d.png" % i for i in range(19)] + ["mean_m_per_layer.png"]
    for name in pngs:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    events = glob.glob(str(out / "tensorboard" / "BN_PARAMS" / "events.out.tfevents.*"))
    assert len(events) == 1
    histograms = {}
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            histograms.setdefault(value.tag, []).append(
                (event.step, tf.make_ndarray(value.tensor)))
    step, buckets = histograms["bn/block_2_0/bn1/m"][0]
    assert step == 7 and buckets[:, 2].sum() == 32
    m = folded["BN PARAMS"][7][0]
    np.testing.assert_allclose([buckets[0, 0], buckets[-1, 1]], [m.min(), m.max()], rtol=1e-5)
    assert [s for s, _ in histograms["bn_by_layer/m"]] == list(range(19))
    assert {f"bn/init_bn/{k}" for k in analysis.BN_VARIABLES} <= set(histograms)


def test_analysis_bn_refuses_mismatched_labels(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main(["bn", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A",
                       "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "2 models" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# The Table 2 runner


def _shipped(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "configs", "fragile", name)


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_shipped_config_sets_cover_every_table_2_row(name):
    rows = fragile.load_rows(_shipped(name))
    assert [row.key for row, _, _ in rows] == [row.key for row in fragile.ROWS]
    normal_dir = rows[0][1].model_dir
    for row, config, _ in rows:
        # The attack runs through the training forward: eval mode, except for the batch-
        # statistics reading of BN ONLY PARAMS, whose forward is batch_frozen.
        attack_mode = "batch_frozen" if row.trainable == "bn_affine_batch" else "population"
        assert config.model == "resnet20" and config.train_attack_bn_mode == attack_mode
        if row.fine_tuned:
            assert config.init_checkpoint == normal_dir


def test_a_config_in_the_wrong_row_is_refused(tmp_path):
    raw = json.load(open(os.path.join(_shipped("digits"), "bn_params.json"), encoding="utf-8"))
    raw["trainable"] = "bn_affine"
    (tmp_path / "bn_params.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="trainable is 'bn_affine', the row needs 'bn'"):
        fragile.load_rows(str(tmp_path))


@pytest.mark.slow
@pytest.mark.extended
def test_runner_trains_evaluates_and_writes_the_table_and_analysis(tmp_path):
    os.makedirs(tmp_path / "configs")
    for key in ("normal", "adv", "bn_stats", "bn_params"):
        raw = json.load(open(os.path.join(_shipped("digits"), key + ".json"), encoding="utf-8"))
        raw.update(model_dir=str(tmp_path / "models" / key), max_num_training_steps=2,
                   training_batch_size=8, step_size_schedule=[[0, 0.05]],
                   num_checkpoint_steps=2, eval_batch_size=8)
        if raw["init_checkpoint"]:
            raw["init_checkpoint"] = str(tmp_path / "models" / "normal")
        (tmp_path / "configs" / (key + ".json")).write_text(json.dumps(raw))
    settings = fragile.EvalSettings(num_robust_examples=8, aa_steps=2, aa_targets=2,
                                    aa_queries=3, pgd_steps=2)
    lines = []
    records = fragile.run(str(tmp_path / "configs"), str(tmp_path / "out"), settings,
                          out=lines.append)
    assert [r["row"] for r in records] == ["normal", "adv", "bn_stats", "bn_params"]
    for r in records:
        for key in ("robust_error_autoattack", "robust_error_pgd"):
            assert r["robust_error_worst"] >= r[key]
        assert r["clean_error_first_n"] <= r["robust_error_autoattack"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| BN PARAMS | bn | NORMAL | 0.51% |" in table and "| 29.67 | 70.5 |" in table
    assert "not comparable to the paper's" in table
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["rows"] == records
    assert os.path.exists(tmp_path / "out" / "bn_analysis" / "mean_m_per_layer.png")
    # A second run reuses the finished training and the cached evaluation.
    again = fragile.run(str(tmp_path / "configs"), str(tmp_path / "out"), settings,
                        out=lines.append, analysis=False)
    assert again == records


def _eval_setup(tmp_path):
    from madry_ns import data

    keras.utils.set_random_seed(3)
    config = _config(tmp_path, model_width=1, num_eval_examples=24, eval_batch_size=4)
    model = build_model(config)
    _randomize(model)
    return config, model, data.load_dataset(config)


STANDARD = fragile.Settings(num_robust_examples=12, aa_steps=3, aa_targets=2, aa_queries=4,
                            pgd_steps=2, autoattack="standard")


def test_standard_autoattack_on_survivors_counts_what_the_fixed_batch_protocol_counts(tmp_path):
    """The study's 'standard' column (the official protocol: survivors of the whole set,
    re-batched) against the same attacks run on every image of the fixed batch: on these
    per-image (population) forwards both must find the same robust images."""
    from madry_ns import attacks, inference, seeds

    config, model, dataset = _eval_setup(tmp_path)
    record = fragile.evaluate_model(model, dataset, config, STANDARD)
    population = inference.forward(model, config, dataset, "population")
    params = attacks.AutoAttackParams(apgd_steps=3, apgd_targets=2, fab_steps=3,
                                      fab_targets=2, square_queries=4)
    fixed = attacks.auto_attack(
        lambda z: population(z, seeds.reference_draw(config, 0)),
        tf.constant(dataset.test_images[:12]), tf.constant(dataset.test_labels[:12]),
        epsilon=config.epsilon, params=params, survivors=False,
        seed=tf.constant([config.np_random_seed, 0], tf.int64))
    robust = int(np.sum(fixed["robust"].numpy()))
    assert record["robust_error_autoattack"] == pytest.approx(100.0 * (1 - robust / 12))
    assert record["clean_error_first_n"] == pytest.approx(
        100.0 * (1 - np.mean(fixed["clean"].numpy())))
    assert set(record["newly_broken_per_attack"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert record["autoattack_version"] == "standard" and "survivors" in record["autoattack"]
    assert "| robust error % (AutoAttack) |" in fragile.table(
        [{**record, "row": "adv", "reset_bn_stats": False, "init_checkpoint": None,
          "trainable": "all", "trainable_parameters": 1, "total_parameters": 1,
          "dataset": "digits", "model": "resnet20", "model_width": 1}])
    with pytest.raises(ConfigError, match="--autoattack bogus: expected one of legacy"):
        fragile.Settings(autoattack="bogus")


@pytest.mark.parametrize("version, stop_at", [
    ("standard", "  PGD: 8/12 images"), ("standard", "  AutoAttack apgd-t"),
    ("legacy", "  PGD and the ensemble: 8/12 images")])
def test_a_stopped_evaluation_resumes_to_the_uninterrupted_result(tmp_path, version, stop_at):
    import dataclasses

    config, model, dataset = _eval_setup(tmp_path)
    settings = dataclasses.replace(STANDARD, autoattack=version)
    whole = fragile.evaluate_model(model, dataset, config, settings)
    path = str(tmp_path / "fragile_eval.partial.json")
    key = {"checkpoint": "/old/checkout/models/adv/checkpoint-9", "n": 1}

    class Stop(Exception):
        pass

    def stop(line):
        if line.startswith(stop_at):
            raise Stop

    with pytest.raises(Stop):
        fragile.evaluate_model(model, dataset, config, settings, out=stop,
                               progress_path=path, progress_key=key)
    # Resumed in another folder (a moved checkout): the same checkpoint file name.
    lines = []
    moved = {**key, "checkpoint": "/new/models/adv/checkpoint-9"}
    resumed = fragile.evaluate_model(model, dataset, config, settings, out=lines.append,
                                     progress_path=path, progress_key=moved)
    assert lines[0].startswith("resuming the evaluation")
    assert {k: v for k, v in resumed.items() if k != "resumed_from"} == whole
    assert resumed["resumed_from"]["batches"] == (2 if "8/12" in stop_at else 3)
    # Progress made under another key (another checkpoint or settings), or a file of another
    # layout, is not used.
    again = fragile.evaluate_model(model, dataset, config, settings,
                                   progress_path=path, progress_key={"checkpoint": "y"})
    assert again == whole
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"key": key, "batches": 2, "counts": {}}, f)
    assert fragile.evaluate_model(model, dataset, config, settings, progress_path=path,
                                  progress_key=key) == whole


def test_a_moved_model_folder_keeps_its_cached_evaluation(tmp_path):
    """The cache lives beside the checkpoint, so a model folder copied elsewhere (another
    checkout, a kept folder put back) is found evaluated there: the key compares the
    checkpoint's file name and the settings, not the folder."""
    import dataclasses
    import shutil

    config = _config(tmp_path, model_dir=str(tmp_path / "old" / "adv"),
                     max_num_training_steps=2, num_checkpoint_steps=2, num_eval_examples=8,
                     eval_batch_size=4)
    settings = dataclasses.replace(STANDARD, num_robust_examples=8)
    row = next(r for r in fragile.ROWS if r.key == "adv")
    lines = []
    record = fragile.run_row(row, config, settings, out=lines.append)
    assert not any("evaluation cached" in line for line in lines)
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    moved = config.replace(model_dir=str(tmp_path / "new" / "adv"))
    lines = []
    assert fragile.run_row(row, moved, settings, out=lines.append) == record
    assert any("evaluation cached" in line for line in lines)
    # Other settings are another evaluation.
    assert not fragile._same_key({"checkpoint": "/a/checkpoint-2", "settings": {"n": 1}},
                                 {"checkpoint": "/b/checkpoint-2", "settings": {"n": 2}})
    assert not fragile._same_key({"checkpoint": "/a/checkpoint-2", "settings": {"n": 1}},
                                 {"checkpoint": "/a/checkpoint-4", "settings": {"n": 1}})


# ----------------------------------------------------------------------------------------
# Foundation fix found here: atomic writes left every output readable by its owner only


def test_atomic_writes_get_the_permissions_a_plain_open_would(tmp_path):
    from madry_ns import files

    umask = os.umask(0o022)
    try:
        path = tmp_path / "table.md"
        files.atomic_write_text(str(path), "a")
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        files.atomic_write_text(str(path), "b")  # an existing file keeps its mode
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
