"""Training on several devices or machines with TensorFlow's own strategies.

`"distribution": "mirrored"` runs `train.py` under `tf.distribute.MirroredStrategy` (all GPUs,
or all logical CPU devices when there is no GPU); `"multi_worker"` under
`MultiWorkerMirroredStrategy`, the cluster described by `TF_CONFIG`. The loop is the same:

* every worker builds the same global batch (the pipeline is a function of seed and step) and
  replica r takes rows [r m/R, (r + 1) m/R): the data order equals single-device training;
* the attack runs per replica, inside the replicated step, so each replica's local batch keeps
  the n:1 clean:attacked mix (a global 64 on 2 replicas is 24 clean + 8 attacked on each);
  random starts are drawn for the global batch and sliced, so they do not depend on the
  number of replicas;
* losses are averaged over the global batch, gradients summed across replicas;
* BN statistics, `"bn_sync"`: `per_replica` normalizes each replica's batch with its own
  statistics (the paper's single-device semantics, per replica) and averages the replicas'
  moving statistics before every checkpoint, so a checkpoint never holds one replica's copy;
  `synchronized` computes statistics over the global batch (all-reduced), with the global
  n:1 mix. Keras' own layers would silently let per-replica moving statistics diverge and
  checkpoint replica 0's.
* only the chief writes checkpoints, summaries, console lines and the config copy.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import tensorflow as tf

from madry_ns.graph import graph_function


def make_strategy(config) -> tf.distribute.Strategy:
    """The strategy `config.distribution` names (the default strategy for 'none')."""
    if config.distribution == "none":
        return tf.distribute.get_strategy()
    if config.distribution == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=config.worker_timeout_seconds)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def check_batch(config, replicas: int) -> None:
    """The global batch must split evenly, and each replica's part must hold the n:1 mix."""
    from madry_ns.config import shaping_split
    from madry_ns.errors import ConfigError

    if config.training_batch_size % replicas:
        raise ConfigError(f"training_batch_size {config.training_batch_size} (the global batch) "
                          f"does not split evenly over {replicas} replicas")
    local = config.training_batch_size // replicas
    if config.shaping_ratio and min(shaping_split(local, config.shaping_ratio)) < 1:
        raise ConfigError(f"shaping_ratio {config.shaping_ratio} on {replicas} replicas leaves "
                          f"{shaping_split(local, config.shaping_ratio)} clean/attacked samples "
                          f"per replica; both need at least 1")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes: always, except on non-chief multi-worker tasks."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def distribute_batch(strategy, *tensors):
    """Split global-batch tensors by rows over the replicas (replica r gets the r-th slice)."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return tensors

    def rows(t):
        local = int(t.shape[0]) // replicas

        def value(ctx):
            r = ctx.replica_id_in_sync_group
            return t[r * local:(r + 1) * local]

        return strategy.experimental_distribute_values_from_function(value)

    return tuple(rows(t) for t in tensors)


def replica_rows(draw, local_shape):
    """This replica's rows of a draw made for the global batch: `draw(global_shape)` is
    stateless, so every replica (and a single device) sees the same global numbers."""
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    rid = ctx.replica_id_in_sync_group if ctx is not None else 0
    local = local_shape[0]
    full = draw([local * replicas] + list(local_shape[1:]))
    if replicas == 1:
        return full
    return full[rid * local:(rid + 1) * local]


def average_bn_statistics(strategy, model) -> None:
    """Set every replica's moving statistics to their mean over all replicas (and workers);
    for per-replica BN, before every checkpoint."""
    if strategy.num_replicas_in_sync == 1:
        return
    stats = [v for bn in model.bn_layers() for v in (bn.moving_mean, bn.moving_variance)]

    @graph_function
    def average():
        local = strategy.run(lambda: [tf.identity(v) for v in stats])
        for var, value in zip(stats, local):
            var.assign(strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))

    average()


def replica_statistics(strategy, model) -> list:
    """Every replica's copy of every BN moving statistic (for tests and diagnostics)."""
    out = []
    for bn in model.bn_layers():
        for var in (bn.moving_mean, bn.moving_variance):
            out.append([t.numpy() for t in strategy.experimental_local_results(
                getattr(var, "value", var))])
    return out


class WorkerCheckpointDir:
    """Non-chief workers save too (TF's rule for multi-worker checkpoints) but into a
    throw-away folder; the chief saves into model_dir."""

    def __init__(self, model_dir: str, chief: bool, strategy):
        self.chief = chief
        if chief:
            self.path = model_dir
        else:
            task = getattr(strategy.cluster_resolver, "task_id", 0)
            self.path = tempfile.mkdtemp(prefix=f"madry_ns_worker{task}_")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


def tf_config_example(num_workers: int = 2, base_port: int = 23456) -> str:
    """A TF_CONFIG for worker 0 of a localhost cluster (documentation helper)."""
    return json.dumps({"cluster": {"worker": [f"localhost:{base_port + i}"
                                              for i in range(num_workers)]},
                       "task": {"type": "worker", "index": 0}})

