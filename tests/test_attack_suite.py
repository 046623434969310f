"""The evaluation attacks of madry_ns.attacks on tiny models.

* A small convnet trained for seconds on scikit-learn's 8x8 digits (0-255 scale): attacks
  must stay in budget and box, lower accuracy, and repeat under a seed.
* An affine classifier, where the minimal L2 adversarial perturbation has a closed form:
  DeepFool must hit it in one iteration (times the 1.02 overshoot), CW come within 3%
  (1% on average).
* A two-layer tanh network with hand-written numpy gradients: APGD and Square are checked
  step for step against numpy transcriptions of the official AutoAttack loops.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import attacks
from madry_ns.layers import BatchNorm

EPS = 32.0  # 0-255 scale; the digits convnet falls from ~0.94 to ~0.25 under PGD here
SEED = tf.constant([7, 11], tf.int64)


def _accuracy(logits_fn, x, y) -> float:
    return float(np.mean(np.argmax(logits_fn(x), 1) == np.asarray(y)))


def _l2(a, b):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return np.sqrt((d.reshape(len(d), -1) ** 2).sum(1))


def _xent_sum(logits_fn, y):
    return lambda z: tf.reduce_sum(attacks.xent_loss(logits_fn(z), y))


# ------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def digits():
    """(logits_fn, x, y): a convnet trained on 1,497 digits, 64 held-out test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:64], order[300:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[train], d.target[train], epochs=20, batch_size=64, verbose=0)
    return (lambda z: model(z, training=False)), tf.constant(images[test]), \
        tf.constant(d.target[test])


def _affine(seed=0, dim=16, classes=10):
    """An affine classifier on 4x4x1 images near mid-grey, with small logit margins."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (dim, classes)).astype(np.float32)
    b = (-(128.0 * np.ones(dim)) @ w + rng.normal(0, 1, classes)).astype(np.float32)
    return w, b, (lambda z: tf.reshape(tf.cast(z, tf.float32), [-1, dim]) @ w + b)


def _minimal_l2(w, b, x):
    """Closed form for an affine model: distance to the nearest decision hyperplane
    between the predicted class and another, the perturbation reaching it, the norm of
    that hyperplane's normal, and the predicted classes."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    logits = flat @ w + b
    dists, deltas, norms = [], [], []
    for i, pred in enumerate(logits.argmax(1)):
        best = (np.inf, None, None)
        for k in range(w.shape[1]):
            if k != pred:
                wk = (w[:, k] - w[:, pred]).astype(np.float64)
                fk = logits[i, k] - logits[i, pred]
                d = abs(fk) / np.linalg.norm(wk)
                if d < best[0]:
                    best = (d, abs(fk) / np.linalg.norm(wk) ** 2 * wk, np.linalg.norm(wk))
        dists.append(best[0])
        deltas.append(best[1])
        norms.append(best[2])
    return np.array(dists), np.array(deltas), np.array(norms), logits.argmax(1)


class _Mlp:
    """x/255 -> tanh(. W1 + b1) W2 + b2, with its cross-entropy gradient in numpy."""

    def __init__(self, seed=0, dim=64, hidden=12, classes=10):
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(0, 1.0, (dim, hidden))
        self.b1 = rng.normal(0, 0.5, hidden)
        self.w2 = rng.normal(0, 1.0, (hidden, classes))
        self.b2 = rng.normal(0, 0.5, classes)
        self.dim = dim

    def tf_logits(self, z):
        h = tf.tanh(tf.reshape(tf.cast(z, tf.float64), [-1, self.dim]) / 255.0 @ self.w1
                    + self.b1)
        return tf.cast(h @ self.w2 + self.b2, tf.float32)

    def np_logits(self, x):
        return np.tanh(x.reshape(len(x), -1) / 255.0 @ self.w1 + self.b1) @ self.w2 + self.b2

    def np_loss_grad(self, x, y):
        h = np.tanh(x.reshape(len(x), -1) / 255.0 @ self.w1 + self.b1)
        logits = h @ self.w2 + self.b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y])
        p[np.arange(len(y)), y] -= 1.0
        grad = ((p @ self.w2.T) * (1 - h ** 2)) @ self.w1.T / 255.0
        return logits, loss, grad.reshape(x.shape)


# ------------------------------------------------------------------------------------------
# The attack registry: name -> (function, params, uses randomness, L-inf budget or None)


def _eot_xent(logits_fn, x, y, *, seed, **params):
    return attacks.eot_pgd(lambda z, draw: _xent_sum(logits_fn, y)(z), x, seed=seed, **params)


def _ensemble_x_adv(logits_fn, x, y, *, seed, **params):
    return attacks.autoattack_style(logits_fn, x, y, seed=seed, **params)["x_adv"]


ATTACKS = {
    "fgsm": (attacks.fgsm, dict(epsilon=EPS), False, EPS),
    "pgd_cleverhans": (attacks.cleverhans_pgd, dict(epsilon=EPS, num_steps=10,
                                                    step_size=EPS / 4, random_start=True),
                       True, EPS),
    "mim": (attacks.mim, dict(epsilon=EPS, num_steps=10, step_size=EPS / 4), False, EPS),
    "eot_pgd": (_eot_xent, dict(epsilon=EPS, num_steps=10, step_size=EPS / 4,
                                eot_samples=2), True, EPS),
    "apgd_ce": (attacks.apgd, dict(epsilon=EPS, num_steps=20), True, EPS),
    "apgd_dlr": (attacks.apgd, dict(epsilon=EPS, num_steps=20, loss="dlr"), True, EPS),
    "apgd_t": (attacks.apgd_targeted, dict(epsilon=EPS, num_steps=10, num_targets=3),
               True, EPS),
    "square": (attacks.square, dict(epsilon=EPS, num_steps=300), True, EPS),
    "autoattack_style": (_ensemble_x_adv, dict(epsilon=EPS, num_steps=10, num_targets=2,
                                               square_num_steps=100), True, EPS),
    "deepfool": (attacks.deepfool, dict(), False, None),
    "cw_l2": (attacks.carlini_wagner_l2, dict(num_steps=100), False, None),
}


@pytest.fixture(scope="module")
def adversarial(digits):
    """name -> (x_adv, x_adv again with the same seed, x_adv with another seed or None)."""
    logits_fn, x, y = digits
    out = {}
    for name, (attack, params, random, _) in ATTACKS.items():
        fn = attacks.compile_attack(attack, logits_fn, **params)
        first, again = fn(x, y, SEED).numpy(), fn(x, y, SEED).numpy()
        other = fn(x, y, SEED + 1).numpy() if random else None
        assert fn.experimental_get_tracing_count() == 1, name
        out[name] = (first, again, other)
    return out


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_stays_in_budget_and_pixel_box(name, digits, adversarial):
    _, x, _ = digits
    x_adv = adversarial[name][0]
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0
    budget = ATTACKS[name][3]
    if budget is not None:
        assert np.abs(x_adv - x.numpy()).max() <= budget + 1e-3


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_lowers_accuracy(name, digits, adversarial):
    logits_fn, x, y = digits
    clean = _accuracy(logits_fn, x, y)
    assert clean > 0.85
    assert _accuracy(logits_fn, adversarial[name][0], y) < clean - 0.1


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_deterministic_under_its_seed(name, adversarial):
    first, again, other = adversarial[name]
    np.testing.assert_array_equal(first, again)
    if other is not None:  # the seed is really used
        assert not np.array_equal(first, other)


def test_compiled_attack_traces_once_for_new_data_and_seeds(digits):
    logits_fn, x, y = digits
    fn = attacks.compile_attack(attacks.apgd, logits_fn, epsilon=EPS, num_steps=3)
    for i in range(3):
        fn(tf.reverse(x, [0]) if i % 2 else x, y, SEED + i)
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_forwards_only_the_full_batch(name, digits):
    """Batch-statistics models depend on batch composition: no sub-batches, ever."""
    logits_fn, x, y = digits
    attack, params, _, _ = ATTACKS[name]
    sizes = set()

    def recording(z):
        sizes.add(z.shape[0])
        return logits_fn(z)

    small = {k: (min(v, 3) if k == "num_steps" else v) for k, v in params.items()}
    if name == "square":
        small["num_steps"] = 5
    if "square_num_steps" in small:
        small["square_num_steps"] = 5
    attacks.compile_attack(attack, recording, **small)(x, y, SEED)
    assert sizes == {x.shape[0]}


# ------------------------------------------------------------------------------------------
# CleverHans and our PGD


def test_own_pgd_equals_cleverhans_pgd_without_random_start(digits):
    logits_fn, x, y = digits
    params = dict(epsilon=16.0, num_steps=10, step_size=4.0)
    ours = attacks.pgd(_xent_sum(logits_fn, y), x, random_start=False, **params)
    theirs = attacks.cleverhans_pgd(logits_fn, x, y, random_start=False, **params)
    assert not np.array_equal(ours, x)
    np.testing.assert_array_equal(ours, theirs)  # integer pixels and steps: exact


def test_own_pgd_equals_cleverhans_pgd_with_the_same_random_start(digits):
    logits_fn, x, y = digits
    params = dict(epsilon=16.0, num_steps=10, step_size=4.0, random_start=True, seed=(3, 4))
    ours = attacks.pgd(_xent_sum(logits_fn, y), x, **params)
    theirs = attacks.cleverhans_pgd(logits_fn, x, y, **params)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_fgsm_is_one_signed_gradient_step_of_epsilon(digits):
    logits_fn, x, y = digits
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = _xent_sum(logits_fn, y)(x)
    expected = np.clip(x + 16.0 * np.sign(tape.gradient(loss, x)), 0, 255)
    np.testing.assert_array_equal(attacks.fgsm(logits_fn, x, y, epsilon=16.0), expected)


def test_cleverhans_patch_is_undone_after_the_attack(digits):
    import importlib

    logits_fn, x, y = digits
    fgm = importlib.import_module("cleverhans.tf2.attacks.fast_gradient_method")
    before = fgm.compute_gradient
    attacks.mim(logits_fn, x, y, epsilon=8.0, num_steps=1, step_size=2.0)
    assert fgm.compute_gradient is before


# ------------------------------------------------------------------------------------------
# DeepFool and CW


def test_deepfool_perturbation_is_smaller_than_successful_pgd(digits, adversarial):
    logits_fn, x, y = digits
    pgd = attacks.pgd(_xent_sum(logits_fn, y), x, epsilon=EPS, num_steps=20,
                      step_size=EPS / 4, seed=(1, 2))
    fooled = np.argmax(logits_fn(pgd), 1) != y.numpy()
    assert fooled.sum() >= 20
    deepfool = adversarial["deepfool"][0]
    assert np.mean(_l2(deepfool, x)[fooled]) < 0.8 * np.mean(_l2(pgd, x)[fooled])
    assert np.all(np.argmax(logits_fn(deepfool), 1) != np.argmax(logits_fn(x), 1))


def test_deepfool_finds_the_closed_form_minimum_of_an_affine_model_in_one_step():
    w, b, logits_fn = _affine()
    x = np.random.default_rng(1).uniform(110, 145, (8, 4, 4, 1)).astype(np.float32)
    dist, delta, norm, pred = _minimal_l2(w, b, x)
    assert np.all(np.abs(delta).max(1) < 100)  # the [0, 255] box stays inactive
    one_step = attacks.deepfool(logits_fn, x, num_steps=1).numpy()
    np.testing.assert_array_equal(one_step, attacks.deepfool(logits_fn, x).numpy())
    # DeepFool steps (|f| + 1e-5) / ||w||: the minimum plus 1e-5 logit, then overshoots.
    # atol: float32 resolution of pixels near 128.
    np.testing.assert_allclose(_l2(one_step, x), 1.02 * (dist + 1e-5 / norm), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose((one_step - x).reshape(8, -1), 1.02 * delta, atol=1e-3)
    assert np.all(np.argmax(logits_fn(one_step), 1) != pred)


def test_cw_l2_comes_within_a_few_percent_of_the_affine_minimum():
    w, b, logits_fn = _affine()
    pool = np.random.default_rng(2).uniform(110, 145, (64, 4, 4, 1)).astype(np.float32)
    dist = _minimal_l2(w, b, pool)[0]
    # Distances well above Adam's step granularity (lr 5e-3 in tanh space, about 0.3
    # pixel near mid-grey): at d = 0.1 pixel CW lands tens of percent away.
    x = pool[(dist > 1.0) & (dist < 30.0)][:8]
    dist, _, _, pred = _minimal_l2(w, b, x)
    x_adv = attacks.compile_attack(attacks.carlini_wagner_l2, logits_fn,
                                   binary_search_steps=9)(x, pred, SEED).numpy()
    assert np.all(np.argmax(logits_fn(x_adv), 1) != pred)
    ratio = _l2(x_adv, x) / dist
    assert np.all(ratio >= 1.0 - 1e-4) and np.all(ratio <= 1.03), ratio
    assert np.mean(ratio) < 1.01, ratio


def test_cw_returns_the_clean_image_where_it_fails(digits):
    logits_fn, x, y = digits
    x_adv = attacks.carlini_wagner_l2(logits_fn, x, y, num_steps=2,
                                      binary_search_steps=1, initial_const=1e-6).numpy()
    still = np.argmax(logits_fn(x_adv), 1) == y.numpy()
    assert still.any()
    np.testing.assert_array_equal(x_adv[still], x.numpy()[still])


def test_cw_and_deepfool_agree_on_the_convnet(digits, adversarial):
    """Both are minimum-L2 attacks: CW (optimized) should not be far above DeepFool."""
    logits_fn, x, y = digits
    x, y = x[:16], y[:16]
    cw = attacks.compile_attack(attacks.carlini_wagner_l2, logits_fn)(x, y, SEED).numpy()
    correct = np.argmax(logits_fn(x), 1) == y.numpy()
    fooled = correct & (np.argmax(logits_fn(cw), 1) != y.numpy())
    assert fooled.sum() >= correct.sum() - 1
    deepfool = adversarial["deepfool"][0][:16]
    assert np.median(_l2(cw, x)[fooled] / _l2(deepfool, x)[fooled]) < 1.05


# ------------------------------------------------------------------------------------------
# APGD, Square, the ensemble


def test_dlr_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(32, 10)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    y[:8] = z[:8].argmax(1)  # both branches of "is the top class the true one"
    t = rng.integers(0, 10, 32)
    s = np.sort(z, 1)[:, ::-1]
    z_y = z[np.arange(32), y]
    others = np.where(np.eye(10)[y] > 0, -np.inf, z).max(1)
    np.testing.assert_allclose(attacks.dlr_loss(z, y),
                               -(z_y - others) / (s[:, 0] - s[:, 2] + 1e-12), rtol=1e-5)
    np.testing.assert_allclose(
        attacks.dlr_loss_targeted(z, y, t),
        -(z_y - z[np.arange(32), t]) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12),
        rtol=1e-5)


def _apgd_reference(model, x, y, eps, n_iter, rho, t):
    """The official `attack_single_run` (L-inf, CE) transcribed to numpy, float64."""
    lower, upper = np.maximum(x - eps, 0), np.minimum(x + eps, 255)
    shape = [-1] + [1] * (x.ndim - 1)
    x_adv = np.clip(x + eps * t / (np.abs(t).reshape(len(x), -1).max(1).reshape(shape)
                                   + 1e-12), 0, 255)
    x_best, x_best_adv = x_adv.copy(), x_adv.copy()
    loss_steps = np.zeros([n_iter, len(x)])
    logits, loss, grad = model.np_loss_grad(x_adv, y)
    grad_best, acc, loss_best = grad.copy(), logits.argmax(1) == y, loss.copy()
    step = np.full([len(x)] + [1] * (x.ndim - 1), 2.0 * eps)
    x_adv_old = x_adv.copy()
    k, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), \
        max(int(0.03 * n_iter), 1)
    counter3, loss_best_last_check, reduced_last_check = 0, loss_best.copy(), np.ones(len(x))
    for i in range(n_iter):
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.copy()
        a = 0.75 if i > 0 else 1.0
        x1 = np.clip(x_adv + step * np.sign(grad), lower, upper)
        x_adv = np.clip(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), lower, upper)
        logits, loss, grad = model.np_loss_grad(x_adv, y)
        pred = logits.argmax(1) == y
        acc = acc & pred
        x_best_adv[~pred] = x_adv[~pred]
        loss_steps[i] = loss
        ind = loss > loss_best
        x_best[ind], grad_best[ind], loss_best[ind] = x_adv[ind], grad[ind], loss[ind]
        counter3 += 1
        if counter3 == k:
            rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).astype(float)
                        for c in range(k))
            osc = (rises <= k * rho).astype(float)
            no_impr = (1.0 - reduced_last_check) * (loss_best_last_check >= loss_best)
            osc = np.maximum(osc, no_impr)
            reduced_last_check, loss_best_last_check = osc.copy(), loss_best.copy()
            fl = osc > 0
            step[fl] /= 2.0
            x_adv[fl], grad[fl] = x_best[fl], grad_best[fl]
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return x_best, acc, loss_best, x_best_adv


def test_apgd_follows_the_official_algorithm_step_for_step():
    model = _Mlp()
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (16, 8, 8, 1)).astype(np.float32)
    y = model.np_logits(x.astype(np.float64)).argmax(1)
    eps, n_iter, seed = 24.0, 30, tf.constant([5, 6], tf.int64)
    ours = attacks.apgd_single_run(model.tf_logits, x, y, attacks.xent_loss, epsilon=eps,
                                   num_steps=n_iter, rho=0.75, seed=seed)
    t = tf.random.stateless_uniform(x.shape, seed=seed, minval=-1.0, maxval=1.0).numpy()
    ref = _apgd_reference(model, x.astype(np.float64), y, eps, n_iter, 0.75,
                          t.astype(np.float64))
    # float32 (ours) against float64 (reference): the sign of a near-zero gradient
    # component can differ, moving that pixel by one step; allow a few such pixels.
    for got, want in ((ours[0], ref[0]), (ours[3], ref[3])):
        assert np.mean(np.abs(got - want) > 1e-3) < 0.01
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_allclose(ours[2], ref[2], rtol=1e-3)
    assert not ref[1].all() and ref[1].any()  # some images broken, some not


def test_apgd_at_least_as_strong_as_pgd_with_the_same_budget(digits):
    logits_fn, x, y = digits
    for eps in (16.0, EPS):
        pgd = attacks.pgd(_xent_sum(logits_fn, y), x, epsilon=eps, num_steps=20,
                          step_size=eps / 4, seed=(1, 2))
        apgd = attacks.apgd(logits_fn, x, y, epsilon=eps, num_steps=20, seed=(1, 2))
        assert _accuracy(logits_fn, apgd, y) <= _accuracy(logits_fn, pgd, y) + 2 / 64


def test_square_p_schedule_halves_at_autoattacks_iterations():
    p = [float(attacks.square_p(tf.constant(i))) for i in
         (0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 6000,
          6001, 8000, 8001, 10 ** 6)]
    expected = [0.8, 0.8] + [0.8 / 2 ** (j // 2 + 1) for j in range(18)]
    np.testing.assert_allclose(p, expected)


def _square_reference(model, x, y, eps, n_queries, p_init, seed):
    """The official `attack_single_run` (L-inf, margin) in numpy on the same random draws;
    the fixed batch: points already broken are frozen but not dropped."""
    n, h, w, c = x.shape
    lower, upper = np.maximum(x - eps, 0), np.minimum(x + eps, 255)

    def margin(images):
        z = model.np_logits(images)
        zy = z[np.arange(n), y]
        z[np.arange(n), y] = -np.inf
        return zy - z.max(1)

    stripes = tf.random.stateless_uniform([n, 1, w, c], seed=attacks.fold_seed(seed, 0),
                                          minval=-1.0, maxval=1.0).numpy()
    x_best = np.clip(x + eps * np.sign(stripes), 0, 255)
    margin_min = margin(x_best)
    for i in range(n_queries):
        if not (margin_min > 0).any():
            break
        p = p_init / 2 ** sum(i > m for m in attacks.SQUARE_P_HALVINGS)
        s = max(int(round(np.sqrt(p * h * w))), 1)
        u = tf.random.stateless_uniform([2 + c], seed=attacks.fold_seed(seed, i + 1)).numpy()
        vh, vw = int(np.floor(u[0] * (h - s))), int(np.floor(u[1] * (w - s)))
        delta = np.zeros([1, h, w, c])
        delta[:, vh:vh + s, vw:vw + s, :] = 2.0 * eps * np.sign(2.0 * u[2:] - 1.0)
        x_new = np.clip(x_best + delta, lower, upper)
        active = margin_min > 0
        m = margin(np.where(active[:, None, None, None], x_new, x_best))
        improved = active & (m < margin_min)
        margin_min[improved] = m[improved]
        x_best[improved] = x_new[improved]
    return x_best


def test_square_follows_the_official_algorithm_on_the_same_draws():
    model = _Mlp(seed=1)
    x = np.random.default_rng(4).integers(0, 256, (16, 8, 8, 1)).astype(np.float32)
    y = model.np_logits(x.astype(np.float64)).argmax(1)
    seed = tf.constant([8, 9], tf.int64)
    ours = attacks.square(model.tf_logits, x, y, epsilon=24.0, num_steps=200, seed=seed)
    ref = _square_reference(model, x.astype(np.float64), y, 24.0, 200, 0.8, seed)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert (model.np_logits(ref).argmax(1) != y).any()


def test_square_uses_only_the_logits(digits, adversarial):
    logits_fn, x, y = digits
    no_gradient = attacks.compile_attack(attacks.square, lambda z: tf.stop_gradient(
        logits_fn(z)), **ATTACKS["square"][1])
    np.testing.assert_array_equal(no_gradient(x, y, SEED), adversarial["square"][0])


def test_ensemble_is_the_per_image_worst_case(digits):
    logits_fn, x, y = digits
    result = attacks.autoattack_style(logits_fn, x, y, epsilon=16.0, num_steps=10,
                                      num_targets=3, square_num_steps=100, seed=SEED)
    robust = result["clean"].numpy()
    for name in attacks.ATTACKS:
        robust = robust & result[name].numpy()
        assert result["robust"].numpy().mean() <= result[name].numpy().mean()
    np.testing.assert_array_equal(result["robust"], robust)
    assert 0 < robust.mean() < _accuracy(logits_fn, x, y)
    # For a per-image model the mixed output batch is classified as the flags say.
    np.testing.assert_array_equal(np.argmax(logits_fn(result["x_adv"]), 1) == y.numpy(),
                                  robust)
    assert np.abs(result["x_adv"].numpy() - x.numpy()).max() <= 16.0 + 1e-3


def test_ensemble_judges_with_the_classification_forward(digits):
    """A generation forward that is useless (constant) breaks nothing; judged by the real
    model the outputs are then as robust as the clean images."""
    logits_fn, x, y = digits
    result = attacks.autoattack_style(
        lambda z: 0.0 * logits_fn(z) + tf.one_hot(tf.fill([tf.shape(z)[0]], 3), 10), x, y,
        epsilon=16.0, num_steps=3, num_targets=2, square_num_steps=10, classify_fn=logits_fn,
        seed=SEED)
    np.testing.assert_array_equal(result["clean"], np.argmax(logits_fn(x), 1) == y.numpy())


def test_attacks_run_through_batch_statistics():
    """A model normalizing with its batch's statistics (madry_ns BatchNorm, batch_frozen):
    gradients flow through the statistics and the attacks stay in budget."""
    keras.utils.set_random_seed(1)
    conv = keras.layers.Conv2D(8, 3, padding="same")
    bn = BatchNorm()
    dense = keras.layers.Dense(10)

    def logits_fn(z, mode="batch_frozen"):
        h = tf.nn.relu(bn(conv(tf.cast(z, tf.float32) / 255.0), mode=mode))
        return dense(tf.reshape(h, [tf.shape(z)[0], -1]))

    x = tf.constant(np.random.default_rng(5).integers(0, 256, (8, 8, 8, 1)), tf.float32)
    y = tf.argmax(logits_fn(x), 1)
    moving = bn.moving_mean.numpy().copy()
    result = attacks.compile_attack(attacks.autoattack_style, logits_fn, epsilon=8.0,
                                    num_steps=5, num_targets=2, square_num_steps=20)(x, y, SEED)
    assert np.abs(result["x_adv"].numpy() - x.numpy()).max() <= 8.0 + 1e-3
    assert not result["robust"].numpy().all()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving)
    deepfool = attacks.deepfool(logits_fn, x).numpy()
    assert np.all(np.argmax(logits_fn(deepfool), 1) != y.numpy())


@pytest.mark.slow
def test_ensemble_on_madry_wrn_width_1_is_deterministic_and_in_budget():
    from madry_ns.models import MadryWRN

    keras.utils.set_random_seed(0)
    model = MadryWRN(width=1).build_for_input()
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), tf.float32)
    y = tf.constant([0, 1, 2, 3])
    fn = attacks.compile_attack(attacks.autoattack_style,
                                lambda z: model(z, bn_mode="batch_frozen"), epsilon=8.0,
                                num_steps=3, num_targets=2, square_num_steps=5)
    first, again = fn(x, y, SEED), fn(x, y, SEED)
    np.testing.assert_array_equal(first["x_adv"], again["x_adv"])
    assert np.abs(first["x_adv"].numpy() - x.numpy()).max() <= 8.0 + 1e-3


# ------------------------------------------------------------------------------------------
# EOT


def test_eot_with_one_sample_on_a_deterministic_loss_is_exactly_pgd(digits):
    logits_fn, x, y = digits
    params = dict(epsilon=EPS, num_steps=10, step_size=EPS / 4, seed=(3, 5))
    plain = attacks.pgd(_xent_sum(logits_fn, y), x, **params)
    eot = attacks.eot_pgd(lambda z, draw: _xent_sum(logits_fn, y)(z), x, eot_samples=1,
                          **params)
    np.testing.assert_array_equal(plain, eot)


def test_eot_averages_the_gradient_over_draws():
    """loss = <x, w + 3|w| noise>: one draw's sign is right for ~63% of the pixels, the
    average of 200 draws for nearly all."""
    w = np.random.default_rng(6).normal(size=(4, 8, 8, 1)).astype(np.float32)
    x = np.full_like(w, 128.0)

    def loss_fn(z, draw):
        noise = tf.random.stateless_normal(z.shape, seed=draw)
        return tf.reduce_sum(z * (w + 3.0 * np.abs(w) * noise))

    def agreement(k):
        x_adv = attacks.eot_pgd(loss_fn, x, epsilon=8.0, num_steps=1, step_size=8.0,
                                eot_samples=k, random_start=False, seed=(0, 1))
        return np.mean(np.sign(x_adv - x) == np.sign(w))

    assert agreement(1) < 0.75
    assert agreement(200) > 0.98


def test_eot_draw_seeds_are_folded_from_the_seed_step_and_sample():
    """Draw k of step i uses fold_in(fold_in(seed, i), k): replay them by hand."""
    x = np.full((2, 4, 4, 1), 128.0, np.float32)
    seed = tf.constant([4, 2], tf.int64)

    def direction(draw):
        return tf.random.stateless_normal(x.shape, seed=draw)

    x_adv = attacks.eot_pgd(lambda z, draw: tf.reduce_sum(z * direction(draw)), x,
                            epsilon=8.0, num_steps=3, step_size=1.0, eot_samples=2,
                            random_start=False, seed=seed)
    fold = tf.random.experimental.stateless_fold_in
    expected = x.copy()
    for i in range(3):
        draws = [direction(fold(fold(seed, i), k)).numpy() for k in range(2)]
        expected = expected + np.sign((draws[0] + draws[1]) / 2.0)
    np.testing.assert_array_equal(x_adv, expected)
