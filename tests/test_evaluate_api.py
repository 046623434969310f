"""`madry_ns.evaluate_model(model, x, y, ...)` on a plain Keras model at the 0-1 scale."""

from __future__ import annotations

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import madry_ns
from madry_ns import evaluate
from madry_ns.errors import ConfigError

EPS = 0.1  # on the 0-1 scale


@pytest.fixture(scope="module")
def plain():
    """A plain Keras classifier (Keras' own BatchNormalization) on 0-1 images, with a few
    steps of training so its predictions are not constant."""
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.random((24, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(np.int64)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, verbose=0)
    return model, x, y


@pytest.fixture(scope="module")
def result(plain):
    model, x, y = plain
    return madry_ns.evaluate_model(model, x, y, epsilon=EPS, pixel_scale=1.0,
                                   attacks=("fgsm", "adaptive"), batch_size=8, sanity=False,
                                   out=False)


def test_a_plain_model_gets_its_population_column_and_the_asked_rows(result, plain):
    model, x, y = plain
    assert list(result.columns) == ["population"]
    assert result.results["model"] == model.name  # not the default config's architecture
    assert list(result.accuracy) == ["clean", "fgsm", "adaptive"]
    direct = np.argmax(model(x, training=False).numpy(), 1) == y  # independent forward
    np.testing.assert_array_equal(result.robust("clean", "population"), direct)
    assert result.accuracy["clean"]["population"] == pytest.approx(direct.mean())
    assert result.results["inputs"]["epsilon"] == pytest.approx(EPS)
    assert result.results["settings"]["epsilon"] == pytest.approx(EPS * 255)
    assert set(result.seconds) == {"fgsm", "adaptive", "total"}
    assert result.worst_case["population"] <= min(result.accuracy["fgsm"]["population"],
                                                  result.accuracy["adaptive"]["population"])


def test_fgsm_at_the_callers_scale_matches_an_independent_fgsm(result, plain):
    """FGSM computed directly on the 0-1 model (tf.GradientTape) flips the same images: the
    0-255 suite and the 0-1 caller mean one budget."""
    model, x, y = plain
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, model(xt, training=False)))
    adv = tf.clip_by_value(xt + EPS * tf.sign(tape.gradient(loss, xt)), 0.0, 1.0)
    direct = np.argmax(model(adv, training=False).numpy(), 1) == y
    np.testing.assert_array_equal(result.robust("fgsm", "population"), direct)


def test_modes_and_rows_a_plain_model_cannot_run_are_refused_before_any_attack(plain,
                                                                               monkeypatch):
    model, x, y = plain
    monkeypatch.setattr(evaluate.api, "run_suite",
                        lambda *a, **k: pytest.fail("an attack ran"))
    with pytest.raises(ConfigError, match="modes batch: .*toolkit's BN layers"):
        madry_ns.evaluate_model(model, x, y, epsilon=EPS, pixel_scale=1.0,
                                modes=("population", "bn"))
    with pytest.raises(ConfigError, match="attacks shaping: .*leave it out"):
        madry_ns.evaluate_model(model, x, y, epsilon=EPS, pixel_scale=1.0,
                                attacks=("fgsm", "shaping"))
    with pytest.raises(ConfigError, match="epsilon is required"):
        madry_ns.evaluate_model(model, x, y)
    with pytest.raises(ConfigError, match="unknown settings cw_iterations"):
        madry_ns.evaluate_model(model, x, y, epsilon=EPS, cw_iterations=3)
    with pytest.raises(ConfigError, match=r"x \(24, 8, 8, 1\) and y \(23,\)"):
        madry_ns.evaluate_model(model, x, y[:-1], epsilon=EPS)


def test_the_result_writes_the_command_lines_files_and_tables(result, tmp_path):
    folder = result.save(str(tmp_path / "suite"))
    saved = json.loads((tmp_path / "suite" / "results.json").read_text())
    assert saved == json.loads(result.to_json())
    assert (tmp_path / "suite" / "results.md").read_text() == result.markdown()
    assert "| attack | PN | seconds |" in result.markdown()
    got, arrays, _ = evaluate.read_suite(folder, "test")  # what --resume and compare read
    assert sorted(arrays) == sorted(result.per_image)
    pd = pytest.importorskip("pandas")
    frame = result.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["population"]
    assert frame.loc["fgsm", "population"] == result.accuracy["fgsm"]["population"]


# RobustBench's published record of Madry's model (model_info/cifar10/Linf/Madry2018Towards.json
# in RobustBench/robustbench), the format a toolkit record must match field for field.
PUBLISHED = {"link": "https://arxiv.org/abs/1706.06083",
             "name": "Towards Deep Learning Models Resistant to Adversarial Attacks",
             "authors": "Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris "
                        "Tsipras, Adrian Vladu", "additional_data": False,
             "number_forward_passes": 1, "dataset": "cifar10", "venue": "ICLR 2018",
             "architecture": "WideResNet-34-10", "eps": "8/255", "clean_acc": "87.14",
             "reported": "47.04", "autoattack_acc": "44.04"}
STORED = os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation", "madry")
META = dict(name="digits Madry", authors="madry_ns", link="https://example.org", venue="-",
            architecture="ResNet-20", dataset="digits")


def test_a_robustbench_record_has_the_published_fields_and_the_suites_numbers(tmp_path):
    stored = evaluate.Result.load(STORED)
    info = stored.robustbench(str(tmp_path / "rb.json"), reported=12.5, **META)
    assert list(info)[:len(PUBLISHED)] == list(PUBLISHED)
    assert set(info) - set(PUBLISHED) == {"footnote"}
    for key, value in PUBLISHED.items():
        assert type(info[key]) is type(value), key
    for key in ("clean_acc", "autoattack_acc", "reported"):
        assert re.fullmatch(r"\d+\.\d\d", info[key]), (key, info[key])
    with np.load(os.path.join(STORED, "per_image.npz"), allow_pickle=False) as z:
        clean, robust = z["clean__pn"], z["clean__pn"] & z["autoattack__pn"]  # the raw file
    assert info["clean_acc"] == f"{100 * clean.mean():.2f}"
    assert info["autoattack_acc"] == f"{100 * robust.mean():.2f}"
    with open(os.path.join(STORED, "results.json"), encoding="utf-8") as f:
        eps = json.load(f)["settings"]["epsilon"]
    assert info["eps"] == f"{eps:g}/255"
    assert "not the standard AutoAttack" in info["footnote"]
    assert "first 100 test images" in info["footnote"]
    assert json.loads((tmp_path / "rb.json").read_text()) == info
    with pytest.raises(ConfigError, match="column 'batch' .*not a deterministic per-image"):
        stored.robustbench(column="batch", **META)

    from madry_ns.evaluate import cli as suite_cli

    out = tmp_path / "cli.json"
    args = [f"--{k}={v}" for k, v in META.items()] + ["--reported", "12.50", "--output",
                                                      str(out)]
    assert suite_cli.main(["robustbench", STORED] + args) == 0
    assert json.loads(out.read_text()) == info


def test_the_table_goes_to_tensorboard_as_text_and_scalars(result, tmp_path):
    import glob

    result.to_tensorboard(str(tmp_path), step=7)
    events = {}
    for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events[value.tag] = (event.step, value)
    expected = {f"suite/{row}/population" for row in ("clean", "fgsm", "adaptive",
                                                      "worst_case")}
    assert expected | {"suite/table"} == set(events)
    step, value = events["suite/fgsm/population"]
    assert step == 7
    assert float(tf.make_ndarray(value.tensor)) == pytest.approx(
        result.accuracy["fgsm"]["population"])
    text = tf.make_ndarray(events["suite/table"][1].tensor).item().decode()
    assert text == result.markdown()
