"""Subprocess entry point for the tf.distribute tests (logical devices must be configured
before TensorFlow initializes, so each scenario runs in a fresh process).

    python tests/distributed_runner.py CONFIG_JSON OUT_JSON [--logical_cpus N] [--probe]
                                       [--float64]

Trains with `madry_ns.training.train(config)` and writes, to OUT_JSON: the final checkpoint,
the number of replicas, every replica's copy of every BN moving statistic, and (--probe)
each replica's view of one shaping batch (rows clean / perturbed).
"""

import json
import os
import sys

import numpy as np


def main():
    config_path, out_path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    import tensorflow as tf

    if "--logical_cpus" in args:
        n = int(args[args.index("--logical_cpus") + 1])
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    if "--float64" in args:  # exactness tests: rounding must not hide or fake a difference
        import keras

        keras.config.set_dtype_policy("float64")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from madry_ns import config as config_lib
    from madry_ns import distribute, training
    from madry_ns.errors import UserError

    config = config_lib.load(config_path)
    result = {"averaging": []}
    original = distribute.average_bn_statistics

    def recording(strategy, model):
        # Every replica's BN statistics before and after each pre-checkpoint averaging.
        before = distribute.replica_statistics(strategy, model)
        original(strategy, model)
        after = distribute.replica_statistics(strategy, model)
        result["averaging"].append({
            "replicas_differed": max(float(np.max(np.abs(r[0] - r[-1]))) for r in before),
            "spread_after": max(float(np.max(np.abs(r[0] - r[-1]))) for r in after),
            "error_vs_mean": max(float(np.max(np.abs(a[0] - np.mean(b, axis=0))))
                                 for a, b in zip(after, before)),
            "values": [r[0].tolist() for r in after]})

    distribute.average_bn_statistics = recording
    try:
        result["final"] = training.train(config, out=print)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    strategy = distribute.make_strategy(config) if config.distribution == "mirrored" else None
    if strategy is not None:
        from madry_ns.models import build_model

        with strategy.scope():
            model = build_model(config)
        result["replicas"] = strategy.num_replicas_in_sync
        if "--probe" in args:
            adversary = training.TrainingAttack(model, config)
            rng = np.random.default_rng(0)
            x = tf.constant(rng.uniform(0, 255, (config.training_batch_size, 32, 32, 3))
                            .astype(np.float32))
            y = tf.constant(rng.integers(0, 10, config.training_batch_size).astype(np.int64))
            dx, dy = distribute.distribute_batch(strategy, x, y)

            @tf.function
            def probe(dx, dy):
                return strategy.run(lambda a, b: (a, adversary(a, b, tf.constant(0, tf.int64))[0]),
                                    args=(dx, dy))

            xs, advs = probe(dx, dy)
            result["probe"] = [
                {"rows": int(a.shape[0]),
                 "clean_rows": [bool(np.array_equal(a.numpy()[i], b.numpy()[i]))
                                for i in range(a.shape[0])]}
                for a, b in zip(strategy.experimental_local_results(xs),
                                strategy.experimental_local_results(advs))]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
