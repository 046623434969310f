"""Madry's TF1 checkpoints and `madry_ns.load_model`.

The reference is a TF1 graph of Madry's model.py built in the test (helpers_dropin), which
writes the checkpoint with his variable names and computes the eval-mode logits itself.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import madry_ns
from helpers_dropin import REPO, tiny_config, write_madry_tf1_checkpoint
from madry_ns import checkpoints, models
from madry_ns.errors import CheckpointError

RTOL = 1e-5


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tf1_width1(tmp_path_factory, images):
    model_dir = tmp_path_factory.mktemp("tf1_w1") / "adv_trained"
    prefix, logits = write_madry_tf1_checkpoint(model_dir, images, width=1, step=70)
    return str(model_dir), prefix, logits


def test_import_madry_ns_does_not_import_tensorflow():
    code = "import sys, madry_ns; assert 'tensorflow' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                            capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_fixture_checkpoint_has_madry_names_slots_and_global_step(tf1_width1):
    _, prefix, _ = tf1_width1
    shapes = dict(tf.train.list_variables(prefix))
    assert shapes["input/init_conv/DW"] == [3, 3, 3, 16]
    assert shapes["unit_1_0/shared_activation/BatchNorm/moving_variance"] == [16]
    assert shapes["unit_2_0/residual_only_activation/BatchNorm/gamma"] == [16]
    assert shapes["unit_3_4/sub2/conv2/DW"] == [3, 3, 64, 64]
    assert shapes["unit_last/BatchNorm/beta"] == [64]
    assert shapes["logit/DW"] == [64, 10] and shapes["logit/biases"] == [10]
    assert shapes["unit_1_0/sub1/conv1/DW/Momentum"] == [3, 3, 16, 16]
    assert shapes["global_step"] == []
    assert checkpoints.OBJECT_GRAPH_KEY not in shapes
    reader = tf.train.load_checkpoint(prefix)
    assert np.abs(reader.get_tensor("logit/DW/Momentum")).max() > 0  # one real update


def test_load_model_tf1_logits_match_the_tf1_graph(tf1_width1, images):
    model_dir, prefix, reference = tf1_width1
    model = madry_ns.load_model(model_dir)
    assert isinstance(model, models.MadryWRN) and model.width == 1
    assert relative_error(model(images).numpy(), reference) < RTOL
    by_prefix = madry_ns.load_model(prefix)
    assert relative_error(by_prefix(images, bn_mode="population").numpy(), reference) < RTOL


def test_load_model_tf1_width2_logits_match_including_the_padded_first_shortcut(
        tmp_path, images):
    # At width 1 unit_1_0 is 16 -> 16 (identity shortcut); width 2 (16 -> 32) takes the
    # channel-pad path that Madry's width 10 (16 -> 160) takes.
    _, reference = write_madry_tf1_checkpoint(tmp_path / "m", images, width=2)
    model = madry_ns.load_model(str(tmp_path / "m"))
    assert model.width == 2
    assert relative_error(model(images).numpy(), reference) < RTOL


def test_logit_comparison_detects_a_single_perturbed_bn_offset(tf1_width1, images):
    # The comparison above is sensitive: one beta changed by 0.05 deep in the net shows.
    model_dir, _, reference = tf1_width1
    model = madry_ns.load_model(model_dir)
    beta = model.tf1_variables()["unit_3_4/sub2/BatchNorm/beta"]
    beta.assign(beta + 0.05)
    assert relative_error(model(images).numpy(), reference) > 100 * RTOL


def test_checkpoint_step_is_tf1_global_step_even_when_renamed(tf1_width1, tmp_path):
    _, prefix, _ = tf1_width1
    assert checkpoints.checkpoint_step(prefix) == 70
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(prefix + suffix, str(tmp_path / "model.ckpt") + suffix)
    assert checkpoints.checkpoint_step(str(tmp_path / "model.ckpt")) == 70


def test_wrong_width_names_the_variable_and_both_shapes(tf1_width1):
    _, prefix, _ = tf1_width1
    model = models.MadryWRN(width=2).build_for_input()
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_weights(model, prefix)
    message = str(err.value)
    assert "unit_1_0/sub1/conv1/DW" in message
    assert "[3, 3, 16, 16]" in message and "[3, 3, 16, 32]" in message
    assert '"model_width": 1' in message


def copy_without(prefix, new_prefix, missing):
    """Rewrite a name-based checkpoint without the variable `missing` (raw SaveV2, as TF1's
    Saver writes)."""
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(n for n in reader.get_variable_to_shape_map() if n != missing)
    tf.raw_ops.SaveV2(prefix=new_prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[reader.get_tensor(n) for n in names])
    return new_prefix


@pytest.mark.parametrize("missing", ["unit_2_3/sub2/BatchNorm/moving_variance",
                                     "input/init_conv/DW"])
def test_missing_variable_is_named_with_its_expected_shape(tf1_width1, tmp_path, missing):
    _, prefix, _ = tf1_width1
    broken = copy_without(prefix, str(tmp_path / "checkpoint-70"), missing)
    assert missing not in dict(tf.train.list_variables(broken))
    with pytest.raises(CheckpointError) as err:
        madry_ns.load_model(broken)
    expected = {"unit_2_3/sub2/BatchNorm/moving_variance": "[32]",
                "input/init_conv/DW": "[3, 3, 3, 16]"}[missing]
    assert f"no variable '{missing}'" in str(err.value) and expected in str(err.value)


def test_missing_width_variable_is_named(tf1_width1, tmp_path):
    _, prefix, _ = tf1_width1
    broken = copy_without(prefix, str(tmp_path / "checkpoint-70"), checkpoints.WIDTH_VARIABLE)
    with pytest.raises(CheckpointError, match="'unit_1_0/sub1/conv1/DW' is missing"):
        madry_ns.load_model(broken)


def test_tf1_checkpoint_into_resnet20_is_a_clear_error(tf1_width1):
    _, prefix, _ = tf1_width1
    with pytest.raises(CheckpointError, match='"model": "madry_wrn"'):
        checkpoints.load_weights(models.ResNet20().build_for_input(), prefix)


def test_latest_checkpoint_follows_a_moved_model_dir(tf1_width1, tmp_path):
    # Madry's zips carry the `checkpoint` state file of the machine they were made on.
    model_dir, prefix, _ = tf1_width1
    moved = tmp_path / "models" / "adv_trained"
    shutil.copytree(model_dir, moved)
    (moved / "checkpoint").write_text(
        'model_checkpoint_path: "/home/madry/models/adv_trained/checkpoint-70"\n'
        'all_model_checkpoint_paths: "/home/madry/models/adv_trained/checkpoint-70"\n')
    assert checkpoints.latest_checkpoint(str(moved)) == str(moved / "checkpoint-70")
    (moved / "checkpoint").unlink()
    assert checkpoints.latest_checkpoint(str(moved)) is None


def test_load_model_on_our_model_dir_uses_its_config(tmp_path, images):
    config = tiny_config(tmp_path, model_width=1)
    tf.keras.utils.set_random_seed(3)
    model = models.build_model(config)
    model.final_bn.moving_mean.assign(tf.fill([64], 0.3))
    checkpoints.Checkpointer(config.model_dir, model, tf.keras.optimizers.SGD()).save(5)
    with open(os.path.join(config.model_dir, "config.json"), "w") as f:
        f.write(config.to_json())
    loaded = madry_ns.load_model(config.model_dir)
    assert isinstance(loaded, models.MadryWRN) and loaded.width == 1
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())


def test_load_model_on_our_checkpoint_without_config_says_what_is_missing(tmp_path):
    model = models.MadryWRN(width=1).build_for_input()
    prefix = checkpoints.Checkpointer(str(tmp_path), model, tf.keras.optimizers.SGD()).save(0)
    with pytest.raises(CheckpointError, match="no config.json next to it"):
        madry_ns.load_model(prefix)


def test_load_model_on_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        madry_ns.load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a folder nor a checkpoint prefix"):
        madry_ns.load_model(str(tmp_path / "checkpoint-70000"))


def test_corrupted_checkpoint_index_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-5.index").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        madry_ns.load_model(str(tmp_path / "checkpoint-5"))
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoints.load_weights(models.MadryWRN(width=1), str(tmp_path / "checkpoint-5"))
