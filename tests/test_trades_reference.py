"""configs/trades_reference.json: TRADES' own settings (yaodongyu/TRADES), and that they train."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from madry_ns import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "configs", "trades_reference.json")
STEPS_PER_EPOCH = 390  # 50,000 CIFAR-10 images at batch 128, the last partial batch dropped


def _eval_overrides():
    with open(PATH, encoding="utf-8") as f:
        return json.load(f)["_eval_overrides"]


def test_the_config_holds_trades_training_settings():
    c = config_lib.load(PATH)
    # train_trades_cifar10.py: epsilon 0.031, step 0.007, 10 steps, beta 6 (0-1 scale).
    assert c.training_method == "trades" and c.trades_beta == 6.0 and c.num_steps == 10
    assert c.epsilon == pytest.approx(0.031 * 255) and c.step_size == pytest.approx(0.007 * 255)
    assert c.trades_init_std == pytest.approx(0.001 * 255)
    # trades.py attacks after model.eval(): running statistics, never updated.
    assert c.train_attack_bn_mode == "population"
    # WideResNet() on ToTensor's 0-1 images, no Normalize; PyTorch BN (the wrn34 default).
    assert (c.model, c.model_width, c.input_normalization) == ("wrn34", 10, "none")
    assert (c.augmentation, c.dataset) == ("pad4_flip", "cifar10")
    # SGD(lr 0.1, momentum 0.9, weight_decay 2e-4) on model.parameters(), batch 128.
    assert (c.momentum, c.weight_decay, c.weight_decay_variables) == (0.9, 2e-4, "all")
    assert c.training_batch_size == 128
    # 76 epochs; lr x 0.1 from epoch 75 (1-based): 74 epochs at 0.1, the boundary step last.
    assert c.max_num_training_steps == 76 * STEPS_PER_EPOCH
    assert c.step_size_schedule == [[0, 0.1], [74 * STEPS_PER_EPOCH - 1, 0.01]]


def test_the_eval_overrides_give_trades_pgd20():
    c = config_lib.load(PATH, _eval_overrides())
    # pgd_attack_cifar10.py: 20 steps of 0.003 within 0.031, uniform random start, eval mode.
    assert (c.num_steps, c.random_start, c.loss_func) == (20, True, "xent")
    assert c.step_size == pytest.approx(0.003 * 255) and c.epsilon == pytest.approx(0.031 * 255)
    assert (c.inference_bn, c.eval_attack_bn) == ("population", "inference")


def _tiny(overrides=()):
    """The reference config on a narrow WRN-34 (16/16/32/64) and digits, batch 8."""
    return config_lib.load(PATH, ["dataset=digits", "model_width=1", "training_batch_size=8",
                                  *overrides])


def test_two_steps_of_the_reference_config_train_a_tiny_model():
    """The training step of the config (TRADES' KL attack through population BN, CE + 6 KL,
    decay on every parameter, 0-1 input) on ResNet-20 at 8x8: tracing a WRN-34 costs CI
    more; the extended test below runs the WRN through train.py."""
    import keras
    import tensorflow as tf

    from madry_ns import models, training

    c = _tiny(["model=resnet20"])
    keras.utils.set_random_seed(0)
    model = models.build_model(c, input_shape=(8, 8, 3))
    optimizer = training.make_optimizer(c)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, c)
    before = [v.numpy().copy() for v in model.variables]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (8, 8, 8, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, 8), tf.int64)
    for i in range(2):
        metrics = step(x, y, tf.constant(i, tf.int64))
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["total_loss"]))
    x_adv = metrics["x_adv"].numpy()
    assert 0 < np.abs(x_adv - x.numpy()).max() <= c.epsilon + 1e-3
    moved = [not np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables)]
    assert sum(moved) > len(moved) // 2  # weights, biases and BN statistics moved


@pytest.mark.slow
@pytest.mark.extended
def test_train_py_runs_the_reference_config_on_digits(tmp_path):
    """Extended (not run by default): two steps of `training.train`, the whole of train.py
    (pad4_flip pipeline, report, checkpoints) on the tiny WRN; a minute or two on 2 cores."""
    import keras

    from madry_ns import checkpoints, training

    model_dir = str(tmp_path / "model")
    c = _tiny([f"model_dir={model_dir}", "max_num_training_steps=2", "num_output_steps=1",
               "num_summary_steps=2", "num_checkpoint_steps=2", "num_eval_examples=8"])
    keras.utils.set_random_seed(0)
    lines = []
    final = training.train(c, out=lines.append)
    assert final.endswith("checkpoint-2")
    start = checkpoints.load_model(os.path.join(model_dir, "checkpoint-0"))
    end = checkpoints.load_model(final)
    moved = [not np.array_equal(a, b) for a, b in zip(start.get_weights(), end.get_weights())]
    assert sum(moved) > len(moved) // 2
    assert any("training adv accuracy" in line for line in lines)
