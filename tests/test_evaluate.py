"""The evaluation suite (madry_ns.evaluate) on a tiny BN convnet trained with shaping.

The model is trained for seconds on scikit-learn's 8x8 digits (0-255 scale) with the paper's
method (3 clean : 1 attacked, the attack through the mixed batch's statistics), so that PGD
generated on population statistics transfers badly to BN+Shaping inference while the adaptive
attack through the shaped forward does not. A second toy model masks its gradient (the input
is quantized under `stop_gradient`): the sanity checks must flag it.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import data, evaluate, shaping
from madry_ns.errors import ConfigError
from madry_ns.layers import BatchNorm

FAST = dict(eot_samples=3, cw_steps=30, cw_search_steps=2, deepfool_iters=10, apgd_steps=8,
            apgd_targets=2, square_queries=30, sanity_restarts=1, sanity_step_factor=2)


class TinyBN(keras.Model):
    """conv-BN-relu twice, then a dense layer; `bn_mode` as madry_ns models."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.masked = masked
        self.conv1 = keras.layers.Conv2D(16, 3, padding="same")
        self.bn1 = BatchNorm()
        self.conv2 = keras.layers.Conv2D(16, 3, strides=2, padding="same")
        self.bn2 = BatchNorm()
        self.dense = keras.layers.Dense(10)

    def call(self, x, training=None, bn_mode="population"):
        x = tf.cast(x, tf.float32)
        if self.masked:  # quantized input with no gradient: a textbook masked defense
            x = tf.stop_gradient(tf.round(x / 128.0) * 128.0) + 0.0 * x  # zero gradient
        h = tf.nn.relu(self.bn1(self.conv1(x / 255.0), mode=bn_mode))
        h = tf.nn.relu(self.bn2(self.conv2(h), mode=bn_mode))
        return self.dense(tf.reshape(h, [tf.shape(x)[0], -1]))


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:300], order[300:]
    return data.Dataset(images[train], d.target[train].astype(np.int64), images[test],
                        d.target[test].astype(np.int64), [str(i) for i in range(10)], "digits")


def _train(dataset, masked=False, steps=300):
    """The paper's method: batch 64, 48 clean + 16 attacked through the mixed batch."""
    keras.utils.set_random_seed(0)
    model = TinyBN(masked)
    model(tf.zeros([2, 8, 8, 1]), bn_mode="batch_update")
    opt = keras.optimizers.Adam(3e-3)
    x_all = tf.constant(dataset.train_images, tf.float32)
    y_all = tf.constant(dataset.train_labels)

    @tf.function
    def step(i):
        idx = tf.random.stateless_uniform([64], [1, i], 0, len(dataset.train_images), tf.int32)
        x, y = tf.gather(x_all, idx), tf.gather(y_all, idx)
        if not masked:
            x_att = shaping.attack_slice(model, x, y, ratio=3, epsilon=32.0, num_steps=3,
                                         step_size=12.0, bn_mode="batch_frozen",
                                         seed=tf.stack([2, i]))
            x = tf.concat([x[:48], x_att], 0)
        with tf.GradientTape() as tape:
            logits = model(x, bn_mode="batch_update")
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))

    for i in range(steps):
        step(tf.constant(i))
    return model


@pytest.fixture(scope="module")
def shaped_model(digits):
    return _train(digits)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from conftest import make_tiny_config

    return make_tiny_config(tmp_path_factory.mktemp("eval"), epsilon=32.0, num_steps=5,
                            step_size=8.0, num_eval_examples=60, eval_batch_size=20,
                            inference_ratio=3)


@pytest.fixture(scope="module")
def result(shaped_model, digits, config):
    return evaluate.evaluate(shaped_model, digits, config, evaluate.Settings(**FAST),
                             out=lambda *_: None)


def _rows(result):
    return {row["key"]: row for row in result["rows"]}


def test_every_attack_stays_in_its_budget_and_the_pixel_box(result, config):
    rows = _rows(result)
    assert set(rows) == set(evaluate.ROW)
    for key, row in rows.items():
        for dist in ([row["perturbation"]] if "linf_max" in row["perturbation"]
                     else row["perturbation"].values()):
            assert 0.0 <= dist["pixel_min"] and dist["pixel_max"] <= 255.0, key
            if row["epsilon"] is not None:
                assert dist["linf_max"] <= row["epsilon"] + 1e-3, key
    assert rows["fgsm16"]["epsilon"] == 16.0 and rows["cw"]["epsilon"] is None


def test_every_attack_lowers_accuracy_where_it_was_generated(result):
    """Each attack, judged where it knows the forward (PN rows in PN, the shaping attack in
    BN, adaptive rows in their own column), is below clean accuracy."""
    rows = _rows(result)
    for key, row in rows.items():
        where = {"population": "population", "shaping": "batch"}.get(
            evaluate.ROW[key].generation)
        for mode, acc in row["accuracy"].items():
            if where in (None, mode):
                assert acc < result["clean"][mode], (key, mode)


def test_the_suite_repeats_itself_under_its_seeds(result, shaped_model, digits, config):
    again = evaluate.evaluate(shaped_model, digits, config,
                              evaluate.Settings(**FAST, attacks=("pgd", "shaping", "adaptive",
                                                                 "eot"), sanity=False),
                              out=lambda *_: None)
    first = _rows(result)
    for row in again["rows"]:
        assert row["accuracy"] == first[row["key"]]["accuracy"], row["key"]
        assert row["perturbation"] == first[row["key"]]["perturbation"], row["key"]
    assert again["clean"] == result["clean"]


def test_adaptive_attacks_on_shaped_inference_beat_the_pn_transfer(result):
    """The paper's headline protocol (PGD generated on PN, classified BN+Shaping) overstates
    robustness; the exact adaptive attack and EOT know the defense."""
    acc = {k: r["accuracy"] for k, r in _rows(result).items()}
    assert acc["adaptive"]["shaped"] <= acc["pgd"]["shaped"]
    assert acc["eot"]["shaped"] <= acc["pgd"]["shaped"]
    assert acc["adaptive_other"]["shaped"] <= acc["pgd"]["shaped"]


def test_pn_generated_attacks_transfer_badly_when_population_statistics_are_off(
        shaped_model, digits, config):
    """The mechanism behind the paper's 0.816: when the moving statistics do not describe
    the batches BN+Shaping normalizes with, PGD generated on PN misses, and only the
    adaptive attack shows the model's real robustness."""
    model = shaped_model
    saved = [v.numpy() for bn in (model.bn1, model.bn2)
             for v in (bn.moving_mean, bn.moving_variance)]
    try:
        for bn in (model.bn1, model.bn2):
            bn.moving_mean.assign(bn.moving_mean + 3.0 * tf.sqrt(bn.moving_variance))
            bn.moving_variance.assign(bn.moving_variance * 16.0)
        result = evaluate.evaluate(model, digits, config,
                                   evaluate.Settings(**FAST, attacks=("pgd", "adaptive"),
                                                     sanity=False), out=lambda *_: None)
    finally:
        for v, value in zip([v for bn in (model.bn1, model.bn2)
                             for v in (bn.moving_mean, bn.moving_variance)], saved):
            v.assign(value)
    acc = {k: r["accuracy"]["shaped"] for k, r in _rows(result).items()}
    assert acc["pgd"] - acc["adaptive"] > 0.1, acc
    assert result["clean"]["shaped"] - acc["pgd"] < 0.05  # the transfer barely hurts


def test_deepfool_moves_less_than_a_successful_pgd(result):
    rows = _rows(result)
    assert rows["deepfool"]["perturbation"]["l2_median"] < rows["pgd"]["perturbation"]["l2_median"]
    assert rows["deepfool"]["accuracy"]["population"] < 0.1  # unbounded: it nearly always succeeds


def test_worst_case_is_per_image_over_the_bounded_attacks(result, config):
    for mode, worst in result["worst_case"].items():
        assert "cw" not in worst["attacks"] and "deepfool" not in worst["attacks"]
        assert "fgsm16" in worst["attacks"]  # 16 <= this config's eps 32
        assert worst["per_image"] <= worst["single_min"] + 1e-12


def test_sanity_checks_pass_on_an_honest_model(result):
    checks = result["sanity"]["checks"]
    assert result["sanity"]["flags"] == [], result["sanity"]["flags"]
    for mode, entry in checks.items():
        assert entry["large_epsilon"]["accuracy"]["255"] <= 0.05
    # PN's clean predictions never depend on the batch; its PGD differs only by the random
    # starts (drawn per batch), within the noise margin; BN's dependence is reported
    sizes = checks["population"]["batch_size"]
    assert len({v["clean"] for v in sizes["accuracy"].values()}) == 1
    assert not sizes["flag"] and sizes["spread"] <= checks["population"]["more_steps"]["noise_margin"]
    assert not checks["batch"]["batch_size"]["flag"]
    assert set(checks["population"]["batch_size"]["accuracy"]) == {"10", "20", "40"}


def test_sanity_checks_flag_a_gradient_masked_model(digits, config):
    masked = _train(digits, masked=True, steps=150)
    result = evaluate.evaluate(masked, digits, config,
                               evaluate.Settings(**FAST, attacks=("fgsm", "adaptive"),
                                                 modes=("pn",)), out=lambda *_: None)
    check = result["sanity"]["checks"]["population"]
    assert check["large_epsilon"]["flag"]
    assert any("eps 255" in f for f in result["sanity"]["flags"])
    md = evaluate.markdown(result)
    assert "**FLAGGED:**" in md and "(FLAG)" in md


def test_results_md_has_the_papers_layout_and_says_how_each_number_was_made(result, tmp_path):
    evaluate.write_results(result, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| attack | BN | PN | BN+Shaping 1:3 | seconds |"
    assert table[2].startswith("| clean |")
    assert table[3].startswith("| FGSM |")
    assert "worst case per image" in table[3 + len(evaluate.ROW)]
    assert "generated on PN" in md and "exact adaptive attack" in md
    assert "No check flagged." in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["clean"] == result["clean"]
    assert {"eot_samples", "epsilon", "inference_seed"} <= set(saved["settings"])
    assert all("seconds" in row for row in saved["rows"])


RESUME_SETTINGS = dict(attacks=("fgsm", "pgd", "shaping", "adaptive"), modes=("pn", "shaped"))


def test_an_interrupted_evaluation_keeps_the_rows_it_finished(shaped_model, digits, config,
                                                             tmp_path, monkeypatch):
    """Hours of attacks are not lost to a kill: results are rewritten after each attack,
    marked incomplete with what is still to run."""
    _interrupt(shaped_model, digits, config, tmp_path, monkeypatch, "pgd",
               dict(attacks=("fgsm", "pgd", "mim"), sanity=False))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["key"] for row in saved["rows"]] == ["fgsm"]
    assert saved["incomplete"] == {"pending_attacks": ["pgd", "mim"], "sanity_pending": False}
    assert saved["worst_case"]["population"]["attacks"] == ["fgsm"]
    md = (tmp_path / "results.md").read_text()
    assert "**Incomplete**" in md and "still to run: pgd, mim." in md
    with np.load(tmp_path / "per_image.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["clean__batch", "clean__population", "clean__shaped",
                                   "fgsm__batch", "fgsm__population", "fgsm__shaped", "labels"]
        assert z["fgsm__population"].mean() == saved["rows"][0]["accuracy"]["population"]
        assert z["clean__batch"].mean() == saved["clean"]["batch"]


def _interrupt(model, digits, config, tmp_path, monkeypatch, stop_at, chosen=RESUME_SETTINGS):
    """Run the `chosen` settings' attacks into tmp_path, stopped as by a Ctrl-C when
    `stop_at` starts (as in the middle of a long run); returns what --resume would load."""
    settings = evaluate.Settings(**{**FAST, **chosen})
    original = evaluate.Suite.generator

    def stopping(self, key, mode):
        if key == stop_at:
            raise KeyboardInterrupt
        return original(self, key, mode)

    monkeypatch.setattr(evaluate.Suite, "generator", stopping)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(model, digits, config, settings, out=lambda *_: None,
                          on_row=lambda partial, arrays: evaluate.write_results(
                              partial, str(tmp_path), arrays))
    monkeypatch.setattr(evaluate.Suite, "generator", original)
    saved = json.loads((tmp_path / "results.json").read_text())
    return {**{k: saved[k] for k in ("num_examples", "dataset", "model", "columns")},
            "checkpoint": None, "settings": saved["settings"]}


def test_resume_runs_only_the_missing_rows_and_matches_an_uninterrupted_run(
        shaped_model, digits, config, tmp_path, monkeypatch):
    """A stopped evaluation resumed with --resume ends with the very table (every row,
    the per-image worst case and the sanity checks) of a run that was never stopped."""
    expected = _interrupt(shaped_model, digits, config, tmp_path, monkeypatch, "shaping")
    original, generated = evaluate.Suite.generator, []

    def counting(self, key, mode):
        generated.append(key)
        return original(self, key, mode)

    # The first resume is stopped again inside the sanity checks, after 3 of their attacks.
    from madry_ns.evaluate import sanity

    attack, checks = sanity.pgd_accuracy, []

    def call(suite, test_batches, mode, **kwargs):  # which attack: column, batch, settings
        return mode, len(test_batches[0][1]), sorted(kwargs.items())

    def stopping(*args, **kwargs):
        if len(checks) == 3:
            raise KeyboardInterrupt
        checks.append(call(*args, **kwargs))
        return attack(*args, **kwargs)

    monkeypatch.setattr(evaluate.Suite, "generator", counting)
    monkeypatch.setattr(sanity, "pgd_accuracy", stopping)
    settings = evaluate.Settings(**{**FAST, **RESUME_SETTINGS})

    def resume():
        return evaluate.evaluate(
            shaped_model, digits, config, settings, out=lambda *_: None,
            previous=evaluate.load_previous(str(tmp_path), expected),
            on_row=lambda partial, arrays: evaluate.write_results(partial, str(tmp_path),
                                                                  arrays))

    with pytest.raises(KeyboardInterrupt):
        resume()
    assert set(generated) == {"shaping", "adaptive"}  # fgsm and pgd were carried over
    stored = evaluate.load_previous(str(tmp_path), expected)
    assert stored["saved"]["incomplete"]["sanity_pending"] and len(stored["sanity_parts"]) == 3
    first = list(checks)
    checks.clear()
    monkeypatch.setattr(sanity, "pgd_accuracy",
                        lambda *a, **k: checks.append(call(*a, **k)) or attack(*a, **k))
    resumed = resume()
    assert resumed["resumed_rows"] == ["fgsm", "pgd", "shaping", "adaptive"]
    assert "incomplete" not in resumed
    assert checks and not any(k in first for k in checks)  # no check's attack ran twice
    monkeypatch.setattr(evaluate.Suite, "generator", original)
    straight = evaluate.evaluate(shaped_model, digits, config, settings, out=lambda *_: None)
    for part in ("clean", "worst_case", "sanity"):
        assert resumed[part] == straight[part], part
    assert [(r["key"], r["accuracy"]) for r in resumed["rows"]] == \
        [(r["key"], r["accuracy"]) for r in straight["rows"]]
    md = (tmp_path / "results.md").read_text()
    assert "carried over from an earlier run" in md and "Incomplete" not in md


def test_a_run_stopped_inside_a_row_resumes_after_the_rows_last_batch(
        shaped_model, digits, config, tmp_path, monkeypatch):
    """Stopped after 4 of the adaptive PGD row's 9 batches (3 columns x 3 batches of 20), the folder
    keeps those 4; the resumed run attacks only the other 5 and ends with the uninterrupted
    run's table, per-image outcomes and distances."""
    settings = evaluate.Settings(**{**FAST, "attacks": ("adaptive", "fgsm"), "sanity": False})
    original, calls = evaluate.Suite.generator, []

    def counting(stop_after):
        def generator(self, key, mode):
            fn = original(self, key, mode)

            def run(x, y, i):
                if len(calls) == stop_after:
                    raise KeyboardInterrupt
                calls.append((key, mode, int(i)))
                return fn(x, y, i)
            return run
        return generator

    def evaluate_into(folder, previous=None):
        return evaluate.evaluate(shaped_model, digits, config, settings, out=lambda *_: None,
                                 previous=previous, on_row=lambda partial, arrays:
                                 evaluate.write_results(partial, str(folder), arrays))

    monkeypatch.setattr(evaluate.Suite, "generator", counting(4))
    with pytest.raises(KeyboardInterrupt):
        evaluate_into(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == []
    assert saved["incomplete"]["pending_attacks"] == ["adaptive", "fgsm"]
    assert saved["incomplete"]["row_in_progress"] == {
        "key": "adaptive", "batches": [3, 1], "of": 3,
        "seconds": saved["incomplete"]["row_in_progress"]["seconds"]}
    assert "adaptive: 3 + 1 of 3 batches per generation made" in \
        (tmp_path / "results.md").read_text()
    first = list(calls)
    expected = {**{k: saved[k] for k in ("num_examples", "dataset", "model", "columns")},
                "checkpoint": None, "settings": saved["settings"]}
    calls.clear()
    monkeypatch.setattr(evaluate.Suite, "generator", counting(None))
    resumed = evaluate_into(tmp_path, evaluate.load_previous(str(tmp_path), expected))
    row_calls = [c for c in calls if c[0] == "adaptive"]
    assert len(first) == 4 and len(row_calls) == 5 and not set(first) & set(row_calls)
    with np.load(tmp_path / "per_image.npz") as z:
        resumed_arrays = {k: z[k] for k in z.files}
    assert not any(k.startswith("partial__") for k in resumed_arrays)
    monkeypatch.setattr(evaluate.Suite, "generator", original)
    straight = evaluate_into(tmp_path / "straight")
    assert "incomplete" not in resumed
    for part in ("clean", "worst_case"):
        assert resumed[part] == straight[part], part
    assert [(r["key"], r["accuracy"], r["perturbation"]) for r in resumed["rows"]] == \
        [(r["key"], r["accuracy"], r["perturbation"]) for r in straight["rows"]]
    with np.load(tmp_path / "straight" / "per_image.npz") as z:
        assert {k: z[k].tolist() for k in z.files} == \
            {k: v.tolist() for k, v in resumed_arrays.items()}


def test_resume_refuses_other_settings_or_other_predictions(shaped_model, digits, config,
                                                           tmp_path, monkeypatch):
    same = _interrupt(shaped_model, digits, config, tmp_path, monkeypatch, "pgd")
    with pytest.raises(ConfigError, match="made with eot_samples 3, this run 7"):
        evaluate.load_previous(str(tmp_path), {**same, "settings": {**same["settings"],
                                                                    "eot_samples": 7}})
    with pytest.raises(ConfigError, match="has num_examples 60, this run 40"):
        evaluate.load_previous(str(tmp_path), {**same, "num_examples": 40})
    assert evaluate.load_previous(str(tmp_path / "nothing"), same) is None
    previous = evaluate.load_previous(str(tmp_path), same)
    previous["clean"]["population"] = ~previous["clean"]["population"]  # as if the checkpoint had changed
    with pytest.raises(ConfigError, match="clean predictions under population differ"):
        evaluate.evaluate(shaped_model, digits, config,
                          evaluate.Settings(**{**FAST, **RESUME_SETTINGS}),
                          out=lambda *_: None, previous=previous)
    (tmp_path / "per_image.npz").unlink()
    with pytest.raises(ConfigError, match="no per_image.npz"):
        evaluate.load_previous(str(tmp_path), same)


def test_a_finished_evaluation_is_not_marked_incomplete(result):
    assert "incomplete" not in result and "Incomplete" not in evaluate.markdown(result)


def test_rows_without_a_column_show_a_dash(result):
    md = evaluate.markdown(result)
    eot = next(line for line in md.splitlines() if line.startswith("| EOT-PGD"))
    assert eot.split("|")[2].strip() == "-" and eot.split("|")[3].strip() == "-"


def test_bad_settings_and_configs_are_clear_errors(config):
    with pytest.raises(ConfigError, match="--attacks .*expected"):
        evaluate.Settings(attacks=("pgd", "bogus"))
    with pytest.raises(ConfigError, match="--modes"):
        evaluate.Settings(modes=("shaped", "batch_frozen"))  # a BN mode, not a column
    with pytest.raises(ConfigError, match="eot_samples"):
        evaluate.Settings(eot_samples=0)
    with pytest.raises(ConfigError, match="multiple of 8"):
        evaluate.check_modes(config.replace(inference_ratio=7, eval_batch_size=20), MODES_ALL)
    # RNA models run in the suite now (tests/test_rna_suite.py); only BN+Shaping is refused
    evaluate.check_modes(config.replace(norm_layer="rna"), ("pn",))
    with pytest.raises(ConfigError, match="random paths"):
        evaluate.check_modes(config.replace(norm_layer="rna"), ("pn", "shaped"))


MODES_ALL = evaluate.MODES


def test_autoattack_custom_row_runs_survivors_in_pn(shaped_model, digits, config):
    """`--autoattack custom` (APGD-CE and FAB-T, tiny budget) through the suite: the row is
    named for its version, its label says the protocol, and its pn cell is exactly the
    attack run on survivors batch by batch. (The label's protocol per column and the
    fixed-batch path are tested in test_autoattack.py.)"""
    from madry_ns import attacks, seeds
    from madry_ns.evaluate import rows

    small = dict(apgd_steps=3, apgd_targets=1, fab_steps=3, fab_targets=1, square_queries=10)
    settings = evaluate.Settings(**{**FAST, **small}, attacks=("autoattack",), modes=("pn",),
                                 autoattack="custom", autoattack_attacks=("apgd-ce", "fab-t"),
                                 sanity=False)
    c = config.replace(num_eval_examples=20)
    result = evaluate.evaluate(shaped_model, digits, c, settings, out=lambda *_: None)
    (row,) = result["rows"]
    assert row["attack"] == "AutoAttack custom"
    assert "FAB-T (3 steps" in row["generation"]
    assert "on survivors" in row["generation"] and "fixed" not in row["generation"]
    assert row["accuracy"]["population"] < result["clean"]["population"]
    params = rows.autoattack_params(settings)
    robust = []
    for i, (x, y) in enumerate(evaluate.suite.batches(digits, c)):
        robust.append(attacks.auto_attack(
            lambda z, draw=None: shaped_model(z, bn_mode="population"), x, y,
            epsilon=float(c.epsilon), params=params, survivors=True,
            seed=seeds.row_start(c, "autoattack", i))["robust"].numpy())
    assert row["accuracy"]["population"] == pytest.approx(np.concatenate(robust).mean())


def test_noise_margin_is_two_standard_errors_plus_one_image():
    assert evaluate.noise_margin(0.5, 100) == pytest.approx(2 * 0.05 + 0.01)
    assert evaluate.noise_margin(0.0, 50) == pytest.approx(0.02)


def test_ablation_markdown_and_heat_map(tmp_path):
    grid = {kind: {"1:1": {"0": 0.5, "3": 0.6}, "1:3": {"0": 0.2, "3": 0.8}}
            for kind in ("clean", "transfer", "adaptive")}
    result = {"checkpoints": {"1:1": "a", "1:3": "b"}, "ratios": [0, 3], "num_examples": 10,
              "dataset": "digits", "eval_batch_size": 20, "epsilon": 8.0, "num_steps": 10,
              "step_size": 2.0, "grid": grid}
    md = evaluate.ablation_markdown(result, "python -m madry_ns.evaluate ablation ...")
    assert "| training \\ inference | 1:0 | 1:3 |" in md
    assert "| 1:3 | 20.00 | 80.00 |" in md
    assert "PGD generated on PN" in md and "exact adaptive" in md
    evaluate.ablation_heatmap(result, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not measured yet" not in md
    # A grid still running: the cells and checkpoints not measured yet show '-'.
    result["checkpoints"]["1:7"] = "c"
    for kind in grid:
        del grid[kind]["1:3"]["3"]
    md = evaluate.ablation_markdown(result)
    assert "| 1:3 | 20.00 | - |" in md and "| 1:7 | - | - |" in md
    assert "'-': not measured yet (3 of 6 cells)." in md
    evaluate.ablation_heatmap(result, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trained_checkpoint(tmp_path):
    """A 4-step narrow-WRN checkpoint of the tiny config and its config file."""
    from madry_ns import training
    from conftest import make_tiny_config

    cfg = make_tiny_config(tmp_path, inference_ratio=1, num_eval_examples=8)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    training.train(cfg, out=lambda *_: None)
    return cfg, path


@pytest.mark.slow
def test_command_line_table_on_a_trained_checkpoint(tmp_path, capsys):
    """`python -m madry_ns.evaluate` on a 4-step narrow-WRN checkpoint."""
    cfg, path = _trained_checkpoint(tmp_path)
    out = tmp_path / "suite"
    assert evaluate.main(["--config", str(path), "--attacks", "pgd,adaptive",
                          "--modes", "pn,shaped", "--no_sanity", "--seed", "3",
                          "--output", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["step"] == 4 and saved["num_examples"] == 8
    assert saved["command"].startswith("python -m madry_ns.evaluate --config")
    assert saved["settings"]["np_random_seed"] == 3 and "sanity" not in saved
    assert list(saved["columns"]) == ["population", "shaped"]
    assert (out / "results.md").read_text().startswith("# Evaluation: ")
    # --resume on a finished output runs nothing and leaves its files as they are
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert evaluate.main(["--config", str(path), "--attacks", "pgd,adaptive",
                          "--modes", "pn,shaped", "--no_sanity", "--seed", "3",
                          "--output", str(out), "--resume"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # asking for one more row runs that row only and says which rows were carried over
    assert evaluate.main(["--config", str(path), "--attacks", "pgd,adaptive,fgsm",
                          "--modes", "pn,shaped", "--no_sanity", "--seed", "3",
                          "--output", str(out), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["resumed_rows"] == ["pgd", "adaptive"]
    assert again["rows"][:2] == saved["rows"] and again["rows"][2]["key"] == "fgsm"
    # a suite compared with itself: every image on the diagonal
    capsys.readouterr()
    assert evaluate.main(["compare", str(out), str(out), "--output", str(tmp_path / "cmp")]) == 0
    same = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert all(r["only"] == [0, 0] and r["sign_test_p"] == 1.0 for r in same["columns"].values())
    assert capsys.readouterr().out == (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_command_line_ablation_on_a_trained_checkpoint(tmp_path):
    """`python -m madry_ns.evaluate ablation` on the same checkpoint under two labels."""
    cfg, path = _trained_checkpoint(tmp_path)
    abl = tmp_path / "abl"
    assert evaluate.main(["ablation", "--config", str(path), "--checkpoints", cfg.model_dir,
                          cfg.model_dir, "--labels", "a", "b", "--ratios", "0,1",
                          "--output", str(abl)]) == 0
    saved = json.loads((abl / "ablation.json").read_text())
    assert set(saved["grid"]["adaptive"]["b"]) == {"0", "1"}
    assert saved["grid"]["clean"]["a"] == saved["grid"]["clean"]["b"]
    assert (abl / "ablation.png").exists() and (abl / "ablation.md").exists()


def test_command_line_errors_exit_2_and_write_nothing(tmp_path, capsys):
    from conftest import make_tiny_config

    cfg = make_tiny_config(tmp_path, inference_ratio=1)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(path), "--attacks", "pgd,nope", "--output", str(out)])
    assert e.value.code == 2 and "--attacks pgd,nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(path), "--output", str(out)])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["ablation", "--config", str(path), "--checkpoints", "x", "--labels",
                       "a", "--ratios", "1,-3", "--output", str(out)])
    assert e.value.code == 2 and "--ratios -3" in capsys.readouterr().err
    assert not out.exists()


def _fake_suite(folder, outcomes: dict, labels, eps=32.0, incomplete=False):
    """A finished suite's files with the given per-image outcomes ({"clean__pn": ..., ...}):
    what `compare` reads, without running an attack."""
    os.makedirs(folder, exist_ok=True)
    modes = sorted({k.split("__")[1] for k in outcomes})
    saved = {"num_examples": len(labels), "dataset": "digits", "settings": {"epsilon": eps},
             "columns": {m: f"{m.upper()} (label)" for m in modes},
             "worst_case": {m: {"attacks": sorted(k.split("__")[0] for k in outcomes
                                                  if k.endswith(m) and
                                                  not k.startswith("clean"))}
                            for m in modes}}
    if incomplete:
        saved["incomplete"] = {"pending_attacks": ["eot"]}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(saved, f)
    np.savez(os.path.join(folder, "per_image.npz"), labels=np.asarray(labels),
             **{k: np.asarray(v, bool) for k, v in outcomes.items()})


def test_compare_counts_images_each_model_keeps_and_tests_the_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 100)
    a = {k: rng.random(100) < p for k, p in
         (("clean__pn", 0.98), ("pgd__pn", 0.85), ("autoattack__pn", 0.8))}
    b = {k: rng.random(100) < p for k, p in
         (("clean__pn", 0.98), ("pgd__pn", 0.75), ("autoattack__pn", 0.7))}
    _fake_suite(tmp_path / "a", a, labels)
    _fake_suite(tmp_path / "b", b, labels)
    result = evaluate.compare(str(tmp_path / "a"), str(tmp_path / "b"), names=("m", "s"))
    ra = a["clean__pn"] & a["pgd__pn"] & a["autoattack__pn"]
    rb = b["clean__pn"] & b["pgd__pn"] & b["autoattack__pn"]
    row = result["columns"]["population"]  # folders keyed 'pn' are read under the new name
    assert row["only"] == [int((ra & ~rb).sum()), int((~ra & rb).sum())]
    assert row["both"] + row["neither"] + sum(row["only"]) == 100
    assert row["accuracy"] == [ra.mean(), rb.mean()]
    from scipy.stats import binomtest  # an independent exact binomial test

    assert row["sign_test_p"] == pytest.approx(binomtest(row["only"][0], sum(row["only"])).pvalue)
    md = evaluate.compare_markdown(result)
    assert "| PN |" in md and "only m" in md and "sign test p" in md


@pytest.mark.parametrize("a,b,p", [(0, 0, 1.0), (14, 2, 0.004180908203125), (3, 3, 1.0),
                                   (5, 0, 0.0625)])
def test_sign_test_matches_known_values(a, b, p):
    assert evaluate.sign_test(a, b) == pytest.approx(p)
    assert evaluate.sign_test(b, a) == pytest.approx(p)


def test_compare_refuses_suites_that_are_not_comparable(tmp_path):
    labels = np.arange(10) % 10
    ok = {"clean__pn": np.ones(10), "pgd__pn": np.ones(10)}
    _fake_suite(tmp_path / "a", ok, labels)
    cases = {
        "other_labels": (dict(outcomes=ok, labels=labels[::-1]), "labels"),
        "other_eps": (dict(outcomes=ok, labels=labels, eps=16.0), "epsilon differs"),
        "unfinished": (dict(outcomes=ok, labels=labels, incomplete=True), "unfinished run"),
        "other_attacks": (dict(outcomes={**ok, "mim__pn": np.ones(10)}, labels=labels),
                          "run the same attacks"),
    }
    for name, (kwargs, message) in cases.items():
        _fake_suite(tmp_path / name, **kwargs)
        with pytest.raises(ConfigError, match=message):
            evaluate.compare(str(tmp_path / "a"), str(tmp_path / name))
    with pytest.raises(ConfigError, match="has no results.json"):
        evaluate.compare(str(tmp_path / "a"), str(tmp_path / "nowhere"))
    os.remove(tmp_path / "other_eps" / "per_image.npz")
    with pytest.raises(ConfigError, match="no per_image.npz"):
        evaluate.compare(str(tmp_path / "a"), str(tmp_path / "other_eps"))
    (tmp_path / "a" / "per_image.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot read .*per_image.npz"):
        evaluate.compare(str(tmp_path / "a"), str(tmp_path / "other_labels"))


def test_folders_written_with_the_earlier_column_names_read_under_the_new_ones():
    """docs/evaluation/ was written when the columns were keyed 'bn'/'pn': read, resumed and
    compared under 'batch'/'population', with every number and label unchanged."""
    from madry_ns.evaluate import resume

    folder = os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation", "madry")
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        raw = json.load(f)
    with np.load(os.path.join(folder, "per_image.npz"), allow_pickle=False) as z:
        raw_arrays = {k: z[k] for k in z.files}
    saved, arrays, _ = evaluate.read_suite(folder, "test")
    new = {"bn": "batch", "pn": "population", "shaped": "shaped"}
    assert list(raw["columns"]) == ["bn", "pn", "shaped"]
    assert saved["columns"] == {new[k]: v for k, v in raw["columns"].items()}
    assert saved["settings"]["modes"] == ["batch", "population", "shaped"]
    assert saved["clean"] == {new[k]: v for k, v in raw["clean"].items()}
    for row, before in zip(saved["rows"], raw["rows"]):
        assert row["accuracy"] == {new[k]: v for k, v in before["accuracy"].items()}
    assert saved["sanity"]["checks"]["population"] == raw["sanity"]["checks"]["pn"]
    assert saved["worst_case"]["batch"] == raw["worst_case"]["bn"]
    assert len(arrays) == len(raw_arrays)
    for name, value in raw_arrays.items():
        head, _, mode = name.rpartition("__")
        renamed = f"{head}__{new[mode]}" if head else name
        np.testing.assert_array_equal(arrays[renamed], value)
    assert evaluate.markdown(saved) == evaluate.markdown(raw)  # the same table, word for word
    again = resume.migrate(saved, arrays)  # current folders pass unchanged
    assert again[0] is saved and again[1] is arrays
    assert evaluate.Settings(modes=("bn", "pn")).modes == ("batch", "population")


def test_the_earlier_modes_flag_values_print_a_notice(capsys):
    from madry_ns.evaluate import cli as suite_cli

    assert suite_cli._modes("bn,shaped") == ("batch", "shaped")
    assert capsys.readouterr().err == "note: --modes bn is now batch\n"
