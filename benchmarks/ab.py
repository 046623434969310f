"""A/B comparisons behind NOTES.md, each in one process with the variants interleaved, so a
busy machine slows both alike. The ResNet-20 PGD-10 training step, batch 64:

    python benchmarks/ab.py fused_bn     # BatchNorm on the fused kernel vs the unfused path
    python benchmarks/ab.py xla          # plain tf.function vs jit_compile on attack + gradient
    python benchmarks/ab.py fused_bn --inter1   # with one inter-op thread
"""

import sys
import time

import numpy as np
import tensorflow as tf

from madry_ns import config as config_lib
from madry_ns import training
from madry_ns.models import build_model

CONFIG = config_lib.from_dict({"model": "resnet20", "training_batch_size": 64, "num_steps": 10})


def make_step(unfused_bn=False, xla=False):
    tf.keras.utils.set_random_seed(0)
    model = build_model(CONFIG)
    if unfused_bn:
        for bn in model.bn_layers():
            bn.synchronized = True  # without a strategy: the unfused path, local statistics
    optimizer = training.make_optimizer(CONFIG)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, CONFIG)
    if xla:
        step._compute = tf.function(step._compute_fn, jit_compile=True)
    return step


def main(argv):
    if "--inter1" in argv:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    variants = {"fused_bn": {"fused": {}, "unfused": {"unfused_bn": True}},
                "xla": {"plain": {}, "xla": {"xla": True}}}[argv[1]]
    steps = {name: make_step(**kw) for name, kw in variants.items()}
    x = tf.random.uniform([64, 32, 32, 3], 0, 255, seed=1)
    y = tf.constant(np.arange(64) % 10, tf.int64)
    for step in steps.values():  # warm-up: traces and first runs
        for i in range(2):
            step(x, y, tf.constant(i, tf.int64))
    times = {name: [] for name in steps}
    for r in range(6):
        for name, step in steps.items():
            start = time.perf_counter()
            float(step(x, y, tf.constant(r, tf.int64))["total_loss"])
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name}: median {np.median(t):.3f} s, min {min(t):.3f} s")


if __name__ == "__main__":
    main(sys.argv)
