"""A/B in one process: the ResNet-20 PGD-10 training step (batch 64) with madry_ns BatchNorm on
the fused kernel vs the unfused path (separate moments + tf.nn.batch_normalization, what Keras
does). Pass `inter1` to run with one inter-op thread. Run: python benchmarks/ab_fused_bn.py"""
import sys, time, numpy as np, tensorflow as tf
from madry_ns import config as C, training
from madry_ns.models import build_model
variant = sys.argv[1] if len(sys.argv) > 1 else ""
if variant == "inter1":
    tf.config.threading.set_inter_op_parallelism_threads(1)
c = C.from_dict({"model": "resnet20", "training_batch_size": 64, "num_steps": 10})
def make(jit, unfused=False):
    tf.keras.utils.set_random_seed(0)
    m = build_model(c)
    if unfused:
        for bn in m.bn_layers(): bn.synchronized = True  # no strategy: the unfused local path
    o = training.make_optimizer(c); o.build(m.trainable_variables)
    st = training.make_train_step(m, o, c)
    if jit:
        st._compute = tf.function(st._compute_fn, jit_compile=True)
    return st
x = tf.random.uniform([64,32,32,3],0,255, seed=1); y = tf.constant(np.arange(64)%10, tf.int64)
steps = {"fused": make(False), "unfused": make(False, True)}
for st in steps.values():
    st(x, y, tf.constant(0, tf.int64)); st(x, y, tf.constant(1, tf.int64))
times = {k: [] for k in steps}
for r in range(6):
    for k, st in steps.items():
        t = time.perf_counter(); float(st(x, y, tf.constant(r, tf.int64))["total_loss"]); times[k].append(time.perf_counter()-t)
for k, v in times.items(): print(variant, k, "median %.3f" % np.median(v), "min %.3f" % min(v))
