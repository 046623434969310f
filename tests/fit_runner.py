"""Subprocess entry point of tests/test_fit.py's MirroredStrategy tests (logical devices must
be configured before TensorFlow initializes).

    python tests/fit_runner.py plain|train_py WORK_DIR OUT_JSON

On two logical CPUs. `plain`: a plain Keras classifier trains 2 Madry PGD steps through
`AdversarialTrainer.fit` under a MirroredStrategy scope; OUT_JSON gets the replica count,
steps, final loss, whether the weights changed and whether the replicas agree. `train_py`:
2 steps with `training.train` (`distribution: mirrored`, shaping), then the same batches
through fit; OUT_JSON gets the largest weight difference between the two and whether the
replicas' BN statistics agree after fit.
"""

import json
import os
import sys


def _replicas_agree(strategy, variables):
    import numpy as np

    return all(np.array_equal(parts[0], parts[-1]) for parts in (
        [t.numpy() for t in strategy.experimental_local_results(getattr(v, "value", v))]
        for v in variables))


def plain(strategy, work):
    import keras
    import numpy as np
    import tensorflow as tf

    import madry_ns

    with strategy.scope():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([
            keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255.0),
            keras.layers.Conv2D(2, 3, padding="same"), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(10)])
        trainer = madry_ns.AdversarialTrainer(net, training_batch_size=8, num_steps=1,
                                              epsilon=16.0, step_size=16.0)
        trainer.compile()
    before = [v.numpy().copy() for v in net.variables]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    history = trainer.fit(data, epochs=1, verbose=0)
    return {"steps": int(trainer.optimizer.iterations.numpy()),
            "loss": history.history["loss"][-1],
            "weights_changed": all(not np.array_equal(a, v.numpy())
                                   for a, v in zip(before, net.variables)),
            "replicas_agree": _replicas_agree(strategy, net.variables)}


def train_py(strategy, work):
    import keras
    import numpy as np

    import madry_ns
    from madry_ns import checkpoints, fit, models, training
    from madry_ns import config as config_lib

    config = config_lib.from_dict({
        "model_dir": os.path.join(work, "train"), "dataset": "digits", "model": "resnet20",
        "model_width": 1, "training_batch_size": 16, "num_steps": 1, "epsilon": 16.0,
        "step_size": 16.0, "shaping_ratio": 3, "augmentation": "crop",
        "distribution": "mirrored", "max_num_training_steps": 2, "num_checkpoint_steps": 100,
        "num_output_steps": 100, "num_summary_steps": 100,
        "step_size_schedule": [[0, 0.1], [1, 0.05]]})
    final = training.train(config, out=lambda *a: None)
    with strategy.scope():
        keras.utils.set_random_seed(config.tf_random_seed)
        model = models.build_model(config)
        trainer = madry_ns.AdversarialTrainer(model, config)
        trainer.compile()
    trainer.fit(fit.training_data(config), steps_per_epoch=2, epochs=1, verbose=0)
    reference = models.build_model(config.replace(distribution="none"))
    checkpoints.load_weights(reference, final)
    difference = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                     for a, b in zip(reference.variables, model.variables))
    return {"max_difference": difference,
            "replicas_agree": _replicas_agree(strategy, model.variables)}


def main():
    scenario, work, out_path = sys.argv[1:4]
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    strategy = tf.distribute.MirroredStrategy([d.name for d in
                                              tf.config.list_logical_devices("CPU")])
    result = {"plain": plain, "train_py": train_py}[scenario](strategy, work)
    result["replicas"] = strategy.num_replicas_in_sync
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
