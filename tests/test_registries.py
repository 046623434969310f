"""Adding an idea touches one place: a toy inference mode and a toy suite row, registered
from here alone (no file of the package edited), run through eval.py's evaluation and the
suite; and the seed streams by name."""

from __future__ import annotations

import numpy as np
import pytest

from madry_ns import config as config_lib
from madry_ns import inference, seeds
from madry_ns.errors import ConfigError

TOY_MODE, TOY_ROW = "toy_flip_average", "toy_uniform_noise"


def _flip_average(model, config, dataset):
    """Test-time augmentation: the mean of the PN logits of x and of x flipped."""
    import tensorflow as tf

    def fn(x, seed):
        del seed
        return 0.5 * (model(x, bn_mode="population") +
                      model(tf.reverse(x, axis=[2]), bn_mode="population"))
    return fn


def _uniform_noise(suite, mode):
    """Uniform L-inf noise at the config's epsilon, from the row's own stream."""
    del mode
    tf, c = suite.tf, suite.config

    def attack(x, y, i):
        noise = tf.random.stateless_uniform(tf.shape(x), seeds.row_start(c, TOY_ROW, i),
                                            -c.epsilon, c.epsilon)
        return tf.clip_by_value(x + noise, 0.0, 255.0)
    return attack


@pytest.fixture
def toys():
    from madry_ns import evaluate

    inference.register(inference.Mode(
        TOY_MODE, _flip_average, label=lambda c, seeding=None: "PN, mean of x and x flipped",
        short=lambda c: "PN+flip", adaptive=lambda c: "white-box through PN+flip",
        bn_mode=None, per_image=True, needs_toolkit_bn=False))
    evaluate.register(evaluate.Row(
        TOY_ROW, "uniform noise", "pn", _uniform_noise, stream=TOY_ROW,
        label=lambda c, s: f"uniform noise in [-{c.epsilon:g}, {c.epsilon:g}]"))
    yield
    evaluate.unregister(TOY_ROW)
    inference.MODES.pop(TOY_MODE)


def _tiny(tmp_path):
    from madry_ns import data
    from madry_ns.models import build_model

    config = config_lib.from_dict({
        "dataset": "digits", "model": "resnet20", "model_width": 1, "num_eval_examples": 20,
        "eval_batch_size": 10, "num_steps": 2, "step_size": 8.0, "epsilon": 16.0,
        "model_dir": str(tmp_path / "m")})
    return config, build_model(config), data.load_dataset(config)


def _direct_flip_accuracy(model, images, labels):
    """The toy mode's clean accuracy computed without the registry."""
    x = images.astype(np.float32)
    logits = model(x, bn_mode="population").numpy() + \
        model(x[:, :, ::-1], bn_mode="population").numpy()
    return float((logits.argmax(1) == labels).mean())


def test_a_registered_mode_is_a_config_value_and_runs_through_eval(toys, tmp_path):
    from madry_ns import evaluation

    config, model, dataset = _tiny(tmp_path)
    toy = config.replace(inference_bn=TOY_MODE)
    result = evaluation.evaluate(model, dataset, toy)
    assert result["natural_accuracy"] == pytest.approx(_direct_flip_accuracy(
        model, dataset.test_images[:20], dataset.test_labels[:20]), abs=1e-9)
    assert result["inference"] == "PN, mean of x and x flipped"
    assert result["attack_short"] == "white-box through PN+flip"
    assert result["adversarial_accuracy"] <= result["natural_accuracy"]
    lines = []
    records = evaluation.watch(toy, model, dataset, checkpoint=_save(model, config),
                               out=lines.append)
    assert records[0]["natural_accuracy"] == result["natural_accuracy"]
    assert "inference: PN, mean of x and x flipped" in lines


def _save(model, config):
    import tensorflow as tf

    return tf.train.Checkpoint(model=model).write(f"{config.model_dir}/checkpoint-1")


def test_a_registered_mode_and_row_run_through_the_suite(toys, tmp_path):
    from madry_ns import evaluate

    config, model, dataset = _tiny(tmp_path)
    settings = evaluate.Settings(attacks=("fgsm", TOY_ROW), modes=("pn", TOY_MODE),
                                 sanity=False)
    result = evaluate.run_suite(model, dataset, config, settings, out=lambda *_: None)
    assert result["columns"][TOY_MODE] == "PN, mean of x and x flipped"
    assert result["clean"][TOY_MODE] == pytest.approx(_direct_flip_accuracy(
        model, dataset.test_images[:20], dataset.test_labels[:20]), abs=1e-9)
    row = next(r for r in result["rows"] if r["key"] == TOY_ROW)
    assert set(row["accuracy"]) == {"population", TOY_MODE} and row["epsilon"] == 16.0
    assert row["perturbation"]["linf_max"] <= 16.0 + 1e-4
    assert TOY_ROW in result["worst_case"][TOY_MODE]["attacks"]
    again = evaluate.run_suite(model, dataset, config, settings, out=lambda *_: None)
    assert again["rows"] == [{**r, "seconds": a["seconds"]}
                             for r, a in zip(result["rows"], again["rows"])]


def test_unregistered_names_are_clear_errors_and_old_column_names_stay():
    with pytest.raises(ConfigError, match="inference_bn"):
        config_lib.from_dict({"inference_bn": "toy_not_registered"})
    with pytest.raises(ConfigError, match="expected one of population, batch, shaped"):
        inference.get("toy_not_registered")
    assert inference.canonical("pn") == "population" and inference.canonical("bn") == "batch"


def test_seed_streams_are_fixed_by_name_and_new_names_get_their_own():
    # The recorded suites (docs/evaluation) were made with these ids: positions in the old
    # row table, 1000 for adaptive PGD.
    assert [seeds.stream_id(k) for k in ("fgsm", "fgsm16", "cleverhans_pgd", "mim", "cw",
                                         "deepfool", "shaping_attack", "eot", "autoattack",
                                         "suite_pgd")] == [0, 1, 2, 3, 4, 5, 6, 9, 10, 1000]
    new = seeds.stream_id(TOY_ROW)
    assert new == seeds.stream_id(TOY_ROW) and new >= 1 << 20
    assert new not in seeds.STREAMS.values() and new != seeds.stream_id("another_row")
