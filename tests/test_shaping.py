"""Batch-norm shaping: splits, the shaped attack, TRADES, shaped inference."""

import numpy as np
import pytest
import tensorflow as tf

from madry_ns import attacks, evaluation, shaping, training
from madry_ns import config as config_lib
from madry_ns.data import Dataset
from madry_ns.errors import ConfigError
from madry_ns.models import MadryWRN

RNG = np.random.default_rng(0)


def _model(seed=1):
    tf.keras.utils.set_random_seed(seed)
    model = MadryWRN(width=1).build_for_input()
    # Non-trivial population statistics, so population and batch modes differ.
    for bn in model.bn_layers():
        bn.moving_mean.assign(RNG.normal(0, 0.3, bn.moving_mean.shape).astype(np.float32))
        bn.moving_variance.assign(RNG.uniform(0.5, 2, bn.moving_variance.shape).astype(np.float32))
    return model


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return tf.constant(x), tf.constant(y)


def _moving(model):
    return [v.numpy().copy() for bn in model.bn_layers()
            for v in (bn.moving_mean, bn.moving_variance)]


def _config(**kw):
    base = dict(training_batch_size=8, num_steps=3, step_size=2.0, epsilon=8.0,
                model_width=1)
    return config_lib.from_dict({**base, **kw})


# ----- splits -----------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,clean,attacked", [(1, 32, 32), (2, 42, 22), (3, 48, 16),
                                                   (7, 56, 8)])
def test_ablation_ratios_split_batch_64_as_the_paper(ratio, clean, attacked):
    assert config_lib.shaping_split(64, ratio) == (clean, attacked)


def test_split_sizes_cover_the_batch_for_every_ratio():
    for m in range(2, 130):
        for n in range(1, 12):
            k, a = config_lib.shaping_split(m, n)
            assert k + a == m and k == (n * m) // (n + 1)


def test_a_ratio_the_batch_cannot_hold_is_a_config_error():
    with pytest.raises(ConfigError, match="shaping_ratio 3 with training_batch_size 1"):
        _config(training_batch_size=1, shaping_ratio=3)
    with pytest.raises(ConfigError, match="not divisible by 10"):
        _config(inference_bn="shaped", inference_ratio=9, eval_batch_size=64)
    with pytest.raises(ConfigError, match="train_attack_bn_mode"):
        _config(shaping_ratio=3, train_attack_bn_mode="population")


# ----- the shaped training attack -----------------------------------------------------------

def test_attack_and_train_keeps_the_clean_slice_bit_identical_and_respects_the_budget():
    model = _model()
    config = _config(shaping_ratio=3)
    x, y = _batch(8)
    x_train, _ = training.TrainingAttack(model, config)(x, y, tf.constant(0, tf.int64))
    k = 6
    np.testing.assert_array_equal(x_train[:k].numpy(), x[:k].numpy())
    delta = np.abs(x_train[k:].numpy() - x[k:].numpy())
    assert delta.max() <= 8.0 + 1e-4 and delta.max() > 0
    assert x_train.numpy().min() >= 0 and x_train.numpy().max() <= 255


def test_shaped_attack_sees_the_mixed_batch_statistics_and_population_does_not():
    """Changing only the clean slice changes the attacked result in batch modes (the
    statistics are shared), and cannot in population mode."""
    model = _model()
    x, y = _batch(8)
    x_other = tf.concat([_batch(6, seed=5)[0], x[6:]], 0)
    common = dict(ratio=3, epsilon=8.0, num_steps=3, step_size=2.0, seed=tf.constant([1, 2]),
                  loss_scope="attacked")
    for mode, differs in [("batch_frozen", True), ("population", False)]:
        a = shaping.attack_slice(model, x, y, bn_mode=mode, **common)
        b = shaping.attack_slice(model, x_other, y, bn_mode=mode, **common)
        assert (not np.array_equal(a.numpy(), b.numpy())) == differs, mode


def test_cross_sample_gradient_flows_through_batch_statistics_only_in_batch_modes():
    model = _model()
    x, y = _batch(8)
    x_clean, x_att = x[:6], x[6:]
    for mode in ("batch_frozen", "batch_update", "population"):
        with tf.GradientTape() as tape:
            tape.watch(x_att)
            logits = model(tf.concat([x_clean, x_att], 0), bn_mode=mode)
            clean_loss = tf.reduce_sum(attacks.xent_loss(logits[:6], y[:6]))
        grad = tape.gradient(clean_loss, x_att)
        norm = float(tf.reduce_sum(tf.abs(grad)))
        assert (norm > 0) == (mode != "population"), (mode, norm)


def test_batch_frozen_shaping_attack_leaves_moving_statistics_untouched():
    model = _model()
    before = _moving(model)
    x, y = _batch(8)
    shaping.attack_slice(model, x, y, ratio=3, epsilon=8.0, num_steps=3, step_size=2.0,
                         bn_mode="batch_frozen", seed=tf.constant([0, 0]))
    for a, b in zip(before, _moving(model)):
        np.testing.assert_array_equal(a, b)


def test_batch_update_attack_updates_moving_statistics_every_step():
    model = _model()
    before = _moving(model)
    x, y = _batch(8)
    shaping.attack_slice(model, x, y, ratio=3, epsilon=8.0, num_steps=2, step_size=2.0,
                         bn_mode="batch_update", seed=tf.constant([0, 0]))
    assert all(not np.array_equal(a, b) for a, b in zip(before, _moving(model)))


def test_train_only_mode_mixes_the_clean_first_rows_with_a_whole_batch_attack():
    model = _model()
    x, y = _batch(8)
    step = tf.constant(3, tf.int64)
    config = _config(shaping_ratio=3, shaping_mode="train_only",
                     train_attack_bn_mode="batch_frozen")
    x_train, _ = training.TrainingAttack(model, config)(x, y, step)
    whole, _ = training.TrainingAttack(model, config.replace(shaping_ratio=0))(x, y, step)
    np.testing.assert_array_equal(x_train[:6].numpy(), x[:6].numpy())
    np.testing.assert_array_equal(x_train[6:].numpy(), whole[6:].numpy())


def test_attack_loss_scope_changes_the_attack():
    model = _model()
    x, y = _batch(8)
    common = dict(ratio=3, epsilon=8.0, num_steps=3, step_size=2.0, seed=tf.constant([1, 2]),
                  bn_mode="batch_frozen")
    whole = shaping.attack_slice(model, x, y, loss_scope="batch", **common)
    part = shaping.attack_slice(model, x, y, loss_scope="attacked", **common)
    assert whole.shape == part.shape == (2, 32, 32, 3)
    assert not np.array_equal(whole.numpy(), part.numpy())


# ----- TRADES -----------------------------------------------------------------------------

def _np_kl(p_logits, q_logits):
    lp = p_logits - np.log(np.exp(p_logits).sum(1, keepdims=True))
    lq = q_logits - np.log(np.exp(q_logits).sum(1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(1)


def _np_ce(logits, y):
    lse = np.log(np.exp(logits).sum(1))
    return lse - logits[np.arange(len(y)), y]


def test_trades_loss_matches_a_hand_computation():
    model = _model()
    config = _config(training_method="trades", trades_beta=6.0, weight_decay=0.0)
    x, y = _batch(8)
    x_adv = x + 3.0
    clean = model(x, bn_mode="batch_frozen").numpy().astype(np.float64)
    adv = model(x_adv, bn_mode="batch_frozen").numpy().astype(np.float64)
    expected = _np_ce(clean, y.numpy()).mean() + 6.0 * _np_kl(clean, adv).mean()
    total, _, _ = training.training_loss(model, config, x, x_adv, y)
    np.testing.assert_allclose(float(total), expected, rtol=1e-4)


def test_trades_with_shaping_updates_with_plain_cross_entropy_by_default():
    model = _model()
    config = _config(training_method="trades", shaping_ratio=3, weight_decay=0.0)
    x, y = _batch(8)
    x_mixed = tf.concat([x[:6], x[6:] + 3.0], 0)
    mixed = model(x_mixed, bn_mode="batch_frozen").numpy().astype(np.float64)
    total, _, _ = training.training_loss(model, config, x, x_mixed, y)
    np.testing.assert_allclose(float(total), _np_ce(mixed, y.numpy()).mean(), rtol=1e-4)
    alt = config.replace(shaping_trades_update="trades")
    clean = model(x, bn_mode="batch_frozen").numpy().astype(np.float64)
    expected = _np_ce(clean, y.numpy()).mean() + 6.0 * _np_kl(clean, mixed).mean()
    total, _, _ = training.training_loss(model, alt, x, x_mixed, y)
    np.testing.assert_allclose(float(total), expected, rtol=1e-4)


def test_trades_attack_increases_the_kl_from_the_clean_prediction():
    model = _model()
    config = _config(training_method="trades", train_attack_bn_mode="population",
                     num_steps=5)
    x, y = _batch(8)
    x_adv, p_clean = training.TrainingAttack(model, config)(x, y, tf.constant(0, tf.int64))
    start = x + config.trades_init_std * tf.random.stateless_normal(
        x.shape, tf.constant([config.np_random_seed, 0], tf.int64))
    kl = lambda z: float(tf.reduce_sum(shaping.kl_divergence(  # noqa: E731
        p_clean, model(z, bn_mode="population"))))
    assert kl(x_adv) > kl(start) * 10
    assert float(tf.reduce_max(tf.abs(x_adv - x))) <= 8.0 + 1e-4


# ----- shaped inference --------------------------------------------------------------------

def _pool(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return shaping.ReferencePool(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_shaped_prediction_equals_a_hand_built_forward_of_the_concatenated_batch():
    model = _model()
    pool = _pool()
    x, _ = _batch(6)
    shaped = shaping.ShapedInference(model, pool, ratio=3, chunk=2, fixed_seed=[4, 4])
    got = shaped.logits(x).numpy()
    refs = shaped.fixed.numpy()
    assert refs.shape == (6, 32, 32, 3)
    for c in range(3):
        chunk = x[2 * c:2 * c + 2].numpy()
        batch = np.concatenate([refs, chunk])          # references first, test last (Eq. 6)
        want = model(batch, bn_mode="batch_frozen").numpy()[6:]
        np.testing.assert_allclose(got[2 * c:2 * c + 2], want, rtol=1e-4, atol=1e-4)


def test_shaped_inference_never_changes_moving_statistics():
    model = _model()
    before = _moving(model)
    x, _ = _batch(10)
    shaping.predict(model, x, _pool(), ratio=4, batch_size=10, seed=[1, 1])
    shaping.predict(model, x, _pool(), ratio=4, mixing="per_sample", seed=[1, 2])
    for a, b in zip(before, _moving(model)):
        np.testing.assert_array_equal(a, b)


def test_shaped_inference_depends_on_references_and_ratio_zero_is_batch_mode():
    model = _model()
    x, _ = _batch(10)
    a = shaping.predict(model, x, _pool(), ratio=4, batch_size=10, seed=[1, 1]).numpy()
    b = shaping.predict(model, x, _pool(), ratio=4, batch_size=10, seed=[1, 1]).numpy()
    c = shaping.predict(model, x, _pool(), ratio=4, batch_size=10, seed=[1, 2]).numpy()
    np.testing.assert_array_equal(a, b)          # seeded: reproducible
    assert not np.allclose(a, c)                  # fresh draws differ
    plain = shaping.predict(model, x, _pool(), ratio=0, batch_size=10).numpy()
    np.testing.assert_allclose(plain, model(x, bn_mode="batch_frozen").numpy(), rtol=1e-5,
                               atol=1e-5)


def test_per_sample_mixing_gives_each_test_image_its_own_forward():
    model = _model()
    x, _ = _batch(3)
    shaped = shaping.ShapedInference(model, _pool(), ratio=2, chunk=1, fixed_seed=[0, 9])
    got = shaped.logits(x).numpy()
    refs = shaped.fixed.numpy()
    for i in range(3):
        want = model(np.concatenate([refs, x[i:i + 1].numpy()]),
                     bn_mode="batch_frozen").numpy()[2:]
        np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-4, atol=1e-4)


def test_partial_final_chunk_keeps_the_ratio():
    model = _model()
    x, _ = _batch(5)
    shaped = shaping.ShapedInference(model, _pool(), ratio=3, chunk=2, fixed_seed=[0, 1])
    got = shaped.logits(x).numpy()
    refs = shaped.fixed.numpy()[:3]                 # 1 test image -> 3 references
    want = model(np.concatenate([refs, x[4:].numpy()]), bn_mode="batch_frozen").numpy()[3:]
    np.testing.assert_allclose(got[4:], want, rtol=1e-4, atol=1e-4)


def test_reference_draws_are_distinct_within_a_group():
    pool = shaping.ReferencePool(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
                                 * np.ones((1, 32, 32, 3), np.uint8))
    refs = pool.draw(4, 30, tf.constant([7, 7], tf.int64)).numpy()[:, :, 0, 0, 0]
    for group in refs:
        assert len(set(group.tolist())) == 30
    assert not np.array_equal(refs[0], refs[1])
    with pytest.raises(ValueError, match="cannot draw 51"):
        pool.draw(1, 51, tf.constant([0, 0], tf.int64))


def test_shaped_forward_costs_one_forward_of_one_plus_r_times_the_batch():
    calls = []

    class Counting(MadryWRN):
        def call(self, x, training=None, bn_mode=None):
            calls.append(int(x.shape[0]))
            return super().call(x, training=training, bn_mode=bn_mode)

    tf.keras.utils.set_random_seed(0)
    model = Counting(width=1).build_for_input()
    calls.clear()
    x, _ = _batch(10)
    shaping.ShapedInference(model, _pool(), ratio=4, chunk=2).logits(x, tf.constant([0, 0]))
    # Eagerly, map_fn runs one forward of (1 + 4) * 2 images per chunk and nothing else:
    # 5 chunks, 50 images in all = (1 + r) x the 10 test images.
    assert calls == [10] * 5


def test_eval_classifier_modes_and_labels():
    model = _model()
    images = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10
    ds = Dataset(images, labels, images[:20], labels[:20], [str(i) for i in range(10)], "t")
    x = images[:10].astype(np.float32)
    for mode in ("population", "batch", "shaped"):
        config = _config(inference_bn=mode, eval_batch_size=10, inference_ratio=4,
                         num_eval_examples=20)
        classify = evaluation.make_classifier(model, config, ds)
        first = classify(x).numpy()
        again = evaluation.make_classifier(model, config, ds)(x).numpy()
        np.testing.assert_array_equal(first, again)  # seeded per call index
        labels_ = evaluation.describe(config)
        assert {"PN": "population", "BN": "batch", "BN+Shaping": "shaped"}[
            labels_["inference"].split(" ")[0]] == mode
    fixed = _config(inference_bn="shaped", inference_references="fixed", eval_batch_size=10,
                    inference_ratio=4)
    assert "exact adaptive" in evaluation.describe(fixed)["attack"]
    transfer = fixed.replace(eval_attack_bn="population")
    assert "generated on PN" in evaluation.describe(transfer)["attack"]


# ----- training end to end -------------------------------------------------------------------

def _train(tmp_path, name, **kw):
    config = config_lib.from_dict({
        "model_dir": str(tmp_path / name), "dataset": "digits", "model_width": 1,
        "max_num_training_steps": 2, "num_output_steps": 1, "num_summary_steps": 1,
        "num_checkpoint_steps": 10, "training_batch_size": 8, "num_steps": 2, **kw})
    lines = []
    path = training.train(config, out=lines.append)
    model = MadryWRN(width=1).build_for_input()
    from madry_ns import checkpoints
    checkpoints.load_weights(model, path)
    return [w.numpy() for w in model.weights], lines


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plain"), "plain")[0]


def test_shaping_ratio_zero_reproduces_plain_madry_training_exactly(tmp_path, plain_weights):
    plain = plain_weights
    inert, _ = _train(tmp_path, "inert", shaping_ratio=0, shaping_mode="train_only",
                      shaping_attack_loss="attacked", trades_beta=1.0)
    for a, b in zip(plain, inert):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [
    dict(shaping_ratio=3),
    dict(shaping_ratio=3, shaping_mode="train_only"),
    # TRADES alone is trained in CI by test_trades_reference and beside shaping below.
    pytest.param(dict(training_method="trades"), marks=[pytest.mark.slow,
                                                        pytest.mark.extended]),
    dict(training_method="trades", shaping_ratio=3),
])
def test_every_training_mode_and_method_trains(tmp_path, kw, plain_weights):
    weights, lines = _train(tmp_path, "run", **kw)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, plain_weights))
    assert all(np.isfinite(w).all() for w in weights)
    assert any(line.startswith("    training adv accuracy") for line in lines)
