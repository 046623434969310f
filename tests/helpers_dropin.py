"""Shared helpers for the drop-in tests (tiny Madry-format data, configs, script runs).

Kept out of conftest.py on purpose: other test files are written on other branches.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_madry_cifar(path, n_train_per_batch: int = 8, n_test: int = 12, seed: int = 0):
    """CIFAR-10 python pickles in Madry's layout (data_batch_1..5, test_batch, batches.meta)
    with random images; returns the test images (uint8 NHWC) and labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)

    def batch(n):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return {b"batch_label": b"test", b"data": rows,
                b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}

    for i in range(1, 6):
        with open(os.path.join(path, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(n_train_per_batch), f, protocol=2)
    test = batch(n_test)
    with open(os.path.join(path, "test_batch"), "wb") as f:
        pickle.dump(test, f, protocol=2)
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck"]]
    with open(os.path.join(path, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_test,
                     b"num_vis": 3072}, f, protocol=2)
    images = test[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(test[b"labels"], np.int64)


def tiny_config_dict(tmp_path, **overrides) -> dict:
    """A width-1 Madry WRN config on tiny data under tmp_path, sized for seconds."""
    values = {
        "_comment": "tiny drop-in test config",
        "model_dir": str(tmp_path / "model"),
        "data_path": str(tmp_path / "cifar10_data"),
        "model_width": 1,
        "max_num_training_steps": 2,
        "num_output_steps": 1,
        "num_summary_steps": 1,
        "num_checkpoint_steps": 1,
        "training_batch_size": 8,
        "num_eval_examples": 10,
        "eval_batch_size": 4,
        "num_steps": 2,
        "step_size": 2.0,
        "store_adv_path": str(tmp_path / "attack.npy"),
    }
    values.update(overrides)
    return values


def tiny_config(tmp_path, **overrides):
    from madry_ns import config as config_lib

    raw = tiny_config_dict(tmp_path, **overrides)
    return config_lib.from_dict(raw, source="test")


def write_config(tmp_path, **overrides) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config_dict(tmp_path, **overrides), indent=1))
    return str(path)


def run_script(name: str, cwd, *args, timeout: float = 300):
    """Run a top-level script as a user would (stdout is a pipe, not a terminal)."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Madry's TF1 model and checkpoint, written independently of madry_ns.models


def _madry_tf1_logits(tf, x_input, width: int, bn_layers: list):
    """Madry's model.py in eval mode, as TF1 graph ops: every variable through
    tf.compat.v1.get_variable in his scopes, so the checkpoint names are his. Appends
    (input, moving_mean, moving_variance) of every BN, in forward order, to `bn_layers`."""
    v1 = tf.compat.v1

    def conv(name, x, in_f, out_f, stride):
        n = 3 * 3 * out_f
        kernel = v1.get_variable(name + "/DW", [3, 3, in_f, out_f], tf.float32,
                                 initializer=v1.random_normal_initializer(
                                     stddev=np.sqrt(2.0 / n)))
        return tf.nn.conv2d(x, kernel, [1, stride, stride, 1], padding="SAME")

    def batch_norm(x):
        # contrib batch_norm, is_training=False: moving statistics, epsilon 1e-3.
        c = x.shape[-1]
        with v1.variable_scope("BatchNorm"):
            beta = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
            gamma = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
            mean = v1.get_variable("moving_mean", [c], initializer=v1.zeros_initializer(),
                                   trainable=False)
            var = v1.get_variable("moving_variance", [c], initializer=v1.ones_initializer(),
                                  trainable=False)
        bn_layers.append((x, mean, var))
        return (x - mean) * (gamma / tf.sqrt(var + 1e-3)) + beta

    def relu(x):
        return tf.where(tf.less(x, 0.0), 0.1 * x, x)

    def residual(x, in_f, out_f, stride, activate_before_residual):
        if activate_before_residual:
            with v1.variable_scope("shared_activation"):
                x = relu(batch_norm(x))
                orig_x = x
        else:
            with v1.variable_scope("residual_only_activation"):
                orig_x = x
                x = relu(batch_norm(x))
        with v1.variable_scope("sub1"):
            x = conv("conv1", x, in_f, out_f, stride)
        with v1.variable_scope("sub2"):
            x = conv("conv2", relu(batch_norm(x)), out_f, out_f, 1)
        if in_f != out_f:
            orig_x = tf.nn.avg_pool2d(orig_x, [1, stride, stride, 1], [1, stride, stride, 1],
                                      "VALID")
            pad = (out_f - in_f) // 2
            orig_x = tf.pad(orig_x, [[0, 0], [0, 0], [0, 0], [pad, pad]])
        return x + orig_x

    with v1.variable_scope("input"):
        x = tf.map_fn(tf.image.per_image_standardization, x_input)
        x = conv("init_conv", x, 3, 16, 1)
    filters = [16, 16 * width, 32 * width, 64 * width]
    strides = [1, 2, 2]
    for s in range(3):
        for i in range(5):
            with v1.variable_scope(f"unit_{s + 1}_{i}"):
                in_f = filters[s] if i == 0 else filters[s + 1]
                x = residual(x, in_f, filters[s + 1], strides[s] if i == 0 else 1,
                             s == 0 and i == 0)
    with v1.variable_scope("unit_last"):
        x = tf.reduce_mean(relu(batch_norm(x)), [1, 2])
    with v1.variable_scope("logit"):
        w = v1.get_variable("DW", [64 * width, 10],
                            initializer=v1.uniform_unit_scaling_initializer(factor=1.0))
        b = v1.get_variable("biases", [10], initializer=v1.constant_initializer())
        return tf.compat.v1.nn.xw_plus_b(x, w, b)


def write_madry_tf1_checkpoint(model_dir, images, width: int = 1, step: int = 70,
                               seed: int = 0):
    """A TF1 name-based checkpoint of Madry's WRN as his train.py's Saver wrote it
    (`model_dir/checkpoint-<step>` + the `checkpoint` state file; weights, BN statistics,
    `<var>/Momentum` slots of one momentum step, `global_step`), with seeded weights and
    non-trivial BN statistics.

    Returns (prefix, eval-mode logits of `images` computed by the TF1 graph itself).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    os.makedirs(str(model_dir), exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        global_step = v1.train.get_or_create_global_step()
        x_input = v1.placeholder(tf.float32, [None, 32, 32, 3])
        y_input = v1.placeholder(tf.int64, [None])
        bn_layers = []
        logits = _madry_tf1_logits(tf, x_input, width, bn_layers)
        moments = [tf.nn.moments(x, [0, 1, 2]) for x, _, _ in bn_layers]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y_input, logits=logits))
        train_op = v1.train.MomentumOptimizer(0.01, 0.9).minimize(loss,
                                                                   global_step=global_step)
        saver = v1.train.Saver(max_to_keep=3)  # every global variable, as Madry's
        # Assignments built before the session starts, so no run has to extend the graph.
        bn_vars = [v for v in v1.global_variables() if "BatchNorm/" in v.op.name
                   and "Momentum" not in v.op.name]
        values = {v: v1.placeholder(tf.float32, v.shape) for v in bn_vars}
        assign = {v: v1.assign(v, ph) for v, ph in values.items()}
        set_step = global_step.assign(step)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            affine = [v for v in bn_vars if v.op.name.endswith(("gamma", "beta"))]
            sess.run([assign[v] for v in affine], {values[v]: (
                rng.uniform(0.5, 1.5, v.shape.as_list()) if v.op.name.endswith("gamma")
                else rng.normal(0.0, 0.2, v.shape.as_list())) for v in affine})
            # Moving statistics near the real ones (layer by layer, each measured with the
            # layers before it already set), perturbed so no BN is the identity: logits stay
            # O(1), where every parameter matters.
            feed = {x_input: np.asarray(images, np.float32)}
            for (_, mean, var), (m, v) in zip(bn_layers, moments):
                m_val, v_val = sess.run([m, v], feed)
                sess.run([assign[mean], assign[var]], {
                    values[mean]: m_val + rng.normal(0, 0.1, m_val.shape) * np.sqrt(v_val),
                    values[var]: v_val * rng.uniform(0.7, 1.4, v_val.shape) + 1e-2})
            labels = rng.integers(0, 10, len(images))
            sess.run(train_op, {x_input: images, y_input: labels})  # fills the slots
            sess.run(set_step)
            reference = sess.run(logits, feed)
            prefix = saver.save(sess, os.path.join(str(model_dir), "checkpoint"),
                                global_step=step)
    return prefix, reference
