"""Subprocess entry point for the synchronized-BN layer test (logical devices must be set
before TensorFlow starts): one `BatchNorm(synchronized=True)` in float64, a batch of 8 split
over two logical CPUs under MirroredStrategy, against the same layer on one device with the
whole batch. Writes, to the JSON path given: both outputs, the gradients of a fixed
readout with respect to the input, gamma and beta, and the moving statistics after the
update; and, as a control, the output of the same layer left unsynchronized.

    python tests/sync_bn_runner.py OUT_JSON
"""

import json
import sys

import numpy as np


def main():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from madry_ns.layers import BatchNorm

    rng = np.random.default_rng(0)
    # A channel whose mean dwarfs its spread, as after a conv with a large bias: the
    # two-pass moments must keep the replicas and the single device together.
    x = rng.normal(size=(8, 3, 3, 4)) + np.array([0.0, 5.0, -2.0, 300.0])
    readout = rng.normal(size=x.shape)

    def run(layer, xs, ws):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = layer(xs, mode="batch_update")
            loss = tf.reduce_sum(y * ws)
        gx, gg, gb = tape.gradient(loss, [xs, layer.gamma, layer.beta])
        return y, gx, gg, gb

    def layer():
        bn = BatchNorm(synchronized=True, dtype="float64")
        bn.build((None, 3, 3, 4))
        bn.gamma.assign(np.linspace(0.5, 2.0, 4))
        bn.beta.assign(np.linspace(-1.0, 1.0, 4))
        return bn

    one = layer()
    y, gx, gg, gb = run(one, tf.constant(x), tf.constant(readout))
    single = {"y": y.numpy(), "gx": gx.numpy(), "gamma": gg.numpy(), "beta": gb.numpy(),
              "mean": one.moving_mean.numpy(), "var": one.moving_variance.numpy()}

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        two, apart = layer(), layer()
        apart.synchronized = False  # the control: each replica's own statistics
    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(x[4 * ctx.replica_id_in_sync_group:][:4]),
                     tf.constant(readout[4 * ctx.replica_id_in_sync_group:][:4])))
    y, gx, gg, gb = strategy.run(tf.function(lambda v: run(two, *v)), args=(halves,))
    local = strategy.experimental_local_results
    y_apart = strategy.run(tf.function(lambda v: run(apart, *v)[0]), args=(halves,))
    replicated = {"y": np.concatenate([t.numpy() for t in local(y)]),
                  "gx": np.concatenate([t.numpy() for t in local(gx)]),
                  # gradients of the variables add up over replicas, as training sums them
                  "gamma": strategy.reduce("SUM", gg, axis=None).numpy(),
                  "beta": strategy.reduce("SUM", gb, axis=None).numpy(),
                  # each replica's own copy (the variables are synchronized on read)
                  "mean": [v.numpy() for v in local(two.moving_mean.value)],
                  "var": [v.numpy() for v in local(two.moving_variance.value)],
                  "replicas": strategy.num_replicas_in_sync,
                  "y_unsynchronized": np.concatenate([t.numpy() for t in local(y_apart)])}
    out = {"single": {k: np.asarray(v).tolist() for k, v in single.items()},
           "mirrored": {k: np.asarray(v).tolist() for k, v in replicated.items()}}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
