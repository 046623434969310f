"""Mixed precision (the GPU configuration), checked for correctness on the CPU."""

import numpy as np
import pytest
import tensorflow as tf

from madry_ns import checkpoints, training
from madry_ns import config as config_lib
from madry_ns.models import build_model


def _config(tmp_path, precision, **kw):
    return config_lib.from_dict({
        "model_dir": str(tmp_path / precision), "dataset": "digits", "model_width": 1,
        "training_batch_size": 16, "num_steps": 2, "max_num_training_steps": 3,
        "num_output_steps": 1, "num_summary_steps": 1, "num_checkpoint_steps": 10,
        "augmentation": "crop", "precision": precision, **kw})


@pytest.mark.parametrize("precision,compute", [("mixed_float16", "float16"),
                                               ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_computes_low_keeps_float32_state_and_matches_float32(tmp_path,
                                                                           precision,
                                                                           compute):
    config = _config(tmp_path, precision)
    tf.keras.utils.set_random_seed(0)
    model = build_model(config)
    assert model.init_conv.compute_dtype == compute
    assert all(v.dtype == "float32" for v in model.weights)       # incl. BN statistics
    x = tf.random.uniform([8, 32, 32, 3], 0, 255, seed=1)
    logits = model(x, bn_mode="batch_frozen")
    assert logits.dtype == tf.float32
    tf.keras.utils.set_random_seed(0)
    reference = build_model(config.replace(precision="float32"))
    for a, b in zip(reference.weights, model.weights):
        a.assign(b.numpy())
    np.testing.assert_allclose(logits.numpy(), reference(x, bn_mode="batch_frozen").numpy(),
                               atol=0.05 if compute == "float16" else 0.3)
    # The global policy is untouched after building.
    assert tf.keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("precision", ["mixed_float16", pytest.param(
    "mixed_bfloat16", marks=[pytest.mark.slow, pytest.mark.extended])])
def test_mixed_precision_trains_counts_every_step_and_resumes(tmp_path, precision):
    config = _config(tmp_path, precision)
    final = training.train(config, out=lambda *a: None)
    assert checkpoints.checkpoint_step(final) == 3
    reader = tf.train.load_checkpoint(final)
    names = [n for n, _ in tf.train.list_variables(final)]
    weights = [reader.get_tensor(n) for n in names if n.startswith("model/")]
    assert all(np.isfinite(w).all() for w in weights)
    # The step counter (the inner optimizer's, under loss scaling) counts every step.
    counter = ("optimizer/inner_optimizer/_iterations" if precision == "mixed_float16"
               else "optimizer/_iterations") + "/.ATTRIBUTES/VARIABLE_VALUE"
    assert int(reader.get_tensor(counter)) == 3
    if precision == "mixed_float16":
        assert any("dynamic_scale" in n for n in names)  # the loss scale is checkpointed
    # Resume continues from the checkpoint with the same optimizer structure.
    lines = []
    training.train(config.replace(max_num_training_steps=4), out=lines.append)
    assert lines[0].startswith("Resuming from")
