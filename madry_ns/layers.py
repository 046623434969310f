"""Batch normalization with an explicit mode.

Keras' `BatchNormalization` ties two decisions to one test (`training and trainable`):
whether to normalize with batch statistics and whether to update the moving averages.
Batch-norm shaping needs the third combination, batch statistics *without* an update,
so `BatchNorm` takes a `mode`:

* ``population``:   moving statistics (Madry's eval model);
* ``batch_update``: batch statistics, moving averages updated (Madry's train model, where
  every train-mode `sess.run`, PGD steps included, updated them);
* ``batch_frozen``: batch statistics, moving averages untouched (shaped inference, attacks
  through batch statistics at evaluation time).

The mode is a Python string argument of `call`, resolved per call. A `tf.function` that
takes it as an argument gets one trace per mode and never a stale one (a layer attribute
flipped after tracing would be silently ignored). Gradients flow through the batch mean and
variance in both batch modes.

The forward uses TensorFlow's fused kernel (`FusedBatchNormV3`), which computes statistics,
normalization and the full gradient in one op; it is markedly faster on CPU than Keras'
separate-moments implementation and works under XLA. The moving variance is updated with the
biased batch variance, as Keras does; TF1's fused path (Madry) used the Bessel-corrected one,
a factor n/(n-1) that is below 1.0002 at Madry's sizes.

`RandomNorm` is the layer of Random Normalization Aggregation (RNA): several normalization
candidates (BN, instance, layer and group norm), one active at a time, chosen by a variable.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from madry_ns.config import rna_candidate_error

BN_MODES = ("population", "batch_update", "batch_frozen")


def resolve_mode(mode: str | None, training: bool | None) -> str:
    """`mode` if given, else Keras' convention: training=True means batch_update."""
    if mode is None:
        return "batch_update" if training else "population"
    if mode not in BN_MODES:
        raise ValueError(f"BN mode {mode!r} is not one of {BN_MODES}")
    return mode


@keras.saving.register_keras_serializable(package="madry_ns")
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with the three modes above.

    Defaults are Madry's (TF1 contrib batch_norm: decay 0.9, epsilon 1e-3). Weights keep
    Keras' names and order: gamma, beta, moving_mean, moving_variance.
    With `synchronized=True`, batch statistics are all-reduced over the replicas of a
    `tf.distribute` strategy (the unfused path; the fused kernel cannot do that).
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)

    def call(self, inputs, training=None, mode: str | None = None, mask=None):
        if mode is None and training and not self.trainable:
            mode = "population"  # Keras: a frozen BN layer runs in inference mode
        mode = resolve_mode(mode, training)
        x = tf.convert_to_tensor(inputs)
        compute_dtype = x.dtype
        if x.dtype not in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
            x = tf.cast(x, tf.float32)
        # The fused kernel takes 16/32-bit inputs only; float64 (used by exactness tests)
        # and synchronized statistics take the unfused path.
        fused = (x.shape.rank == 4 and self.axis in (-1, 3) and not self.synchronized
                 and x.dtype != tf.float64)
        if fused:
            y, mean, var = self._fused(x, mode)
        else:
            y, mean, var = self._unfused(x, mode)
        if mode == "batch_update":
            self._update_moving(mean, var)
        return tf.cast(y, compute_dtype)

    def _fused(self, x, mode):
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones(x.shape[-1])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros(x.shape[-1])
        if mode == "population":
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                is_training=False)
            return y, None, None
        y, mean, var = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, is_training=True)
        # The kernel returns the Bessel-corrected variance; undo it to keep Keras' biased update.
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        var = var * (n - 1.0) / tf.maximum(n, 1.0)
        return y, tf.stop_gradient(mean), tf.stop_gradient(var)

    def _unfused(self, x, mode):
        if x.dtype != tf.float64:
            x = tf.cast(x, tf.float32)
        dtype = x.dtype
        shape = [1] * x.shape.rank
        shape[self.axis % x.shape.rank] = x.shape[self.axis]
        if mode == "population":
            mean, var = self.moving_mean, self.moving_variance
        else:
            mean, var = self._batch_moments(x)
        y = tf.nn.batch_normalization(
            x, tf.reshape(tf.cast(mean, dtype), shape), tf.reshape(tf.cast(var, dtype), shape),
            tf.reshape(tf.cast(self.beta, dtype), shape) if self.center else None,
            tf.reshape(tf.cast(self.gamma, dtype), shape) if self.scale else None,
            self.epsilon)
        if mode == "population":
            return y, None, None
        return y, tf.stop_gradient(mean), tf.stop_gradient(var)

    def _batch_moments(self, x):
        """Batch mean and biased variance per channel; with `synchronized`, over every
        replica's batch. Two passes (the global mean first, then squared deviations from it):
        Keras' one-pass E[x^2] - E[x]^2 loses digits when a channel's mean dwarfs its spread,
        enough to make replicas and a single device part ways within a few steps."""
        axes = [i for i in range(x.shape.rank) if i != self.axis % x.shape.rank]
        ctx = tf.distribute.get_replica_context()
        if not (self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1):
            return tf.nn.moments(x, axes)
        # Every replica holds an equal share of the global batch (the batch is split evenly),
        # so the count needs no reduction; only differentiable sums go through all_reduce.
        count = tf.cast(tf.size(x) // tf.shape(x)[self.axis] * ctx.num_replicas_in_sync,
                        x.dtype)
        mean = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(x, axes)) / count
        squares = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                 tf.reduce_sum(tf.square(x - mean), axes))
        return mean, squares / count

    def _update_moving(self, mean, var):
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + tf.cast(mean, self.moving_mean.dtype)
                                * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m
                                    + tf.cast(var, self.moving_variance.dtype) * (1.0 - m))

    def folded(self):
        """Inference-mode BN as an affine map: BN(x) = m * x + b, per channel.

        m = gamma / sqrt(moving_var + eps), b = beta - m * moving_mean (the fragile-features
        paper's normalized weight and bias).
        """
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        m = gamma / tf.sqrt(self.moving_variance + self.epsilon)
        return m, beta - m * self.moving_mean


# ---------------------------------------------------------------------------------------
# Random Normalization Aggregation (Dong et al., NeurIPS 2022; UniSerj/Random-Norm-Aggregation)

RNA_DEFAULT_CANDIDATES = ("bn", "in")


class CandidateError(ValueError):
    """An RNA candidate that cannot normalize the channels it is given."""


@keras.saving.register_keras_serializable(package="madry_ns")
class RandomNorm(keras.layers.Layer):
    """One normalization layer of RNA: several candidates, one active at a time.

    The released `USNorm` holds one independent module per candidate and runs the selected
    one. Candidates (names as in `rna_candidates`):

    * ``bn``: `BatchNorm` (PyTorch's BatchNorm2d: momentum 0.1, i.e. Keras 0.9, eps 1e-5),
      with the three modes of `BatchNorm`;
    * ``in``: instance norm with per-channel affine, `GroupNormalization` with one channel
      per group (the released default's 'gnr_1' = `nn.GroupNorm(C, C)`);
    * ``ln``: layer norm over (H, W, C) with per-channel affine, one group ('gn_1');
    * ``gn_<g>``: group norm with g groups ('gn_g'; the channels must divide by g).

    Each candidate has its own affine parameters (and, for BN, its own moving statistics).
    The active candidate is the int32 weight `choice` (non-trainable, checkpointed), so a
    compiled function reads it at run time: resampling never retraces. `call` dispatches
    with `tf.switch_case`, so only the active candidate runs and only it updates moving
    statistics, as only the selected module sees the batch in PyTorch. The gradient of an
    inactive candidate's parameters is zero (not None): with momentum they keep moving, as
    in PyTorch 1.x, whose `zero_grad()` left zero gradients (PyTorch >= 2.0 sets them to
    None and skips those parameters).

    `mode` is `BatchNorm`'s: it reaches the BN candidate; the others always normalize with
    the statistics of each sample. `synchronized` is the BN candidate's (`BatchNorm`).
    """

    def __init__(self, candidates=RNA_DEFAULT_CANDIDATES, momentum: float = 0.9,
                 epsilon: float = 1e-5, synchronized: bool = False, **kwargs):
        super().__init__(**kwargs)
        candidates = tuple(candidates)
        if not candidates:
            raise ValueError("RandomNorm needs at least one candidate")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"RandomNorm candidates repeat: {list(candidates)}")
        for name in candidates:
            problem = rna_candidate_error(name)
            if problem:
                raise ValueError(problem)
        self.candidates = candidates
        self.momentum, self.epsilon, self.synchronized = momentum, epsilon, bool(synchronized)
        self.candidate_attributes = []
        for name in candidates:
            # Named attributes, not a list: TF checkpoints track attributes only.
            attribute = "norm_" + name
            setattr(self, attribute, self._make_candidate(name, attribute))
            self.candidate_attributes.append(attribute)

    def _make_candidate(self, name, attribute):
        if name == "bn":
            return BatchNorm(momentum=self.momentum, epsilon=self.epsilon,
                             synchronized=self.synchronized, name=attribute)
        groups = {"in": -1, "ln": 1}.get(name) or int(name[3:])
        return keras.layers.GroupNormalization(groups=groups, epsilon=self.epsilon,
                                               name=attribute)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def candidate(self, index_or_name):
        """The layer of one candidate, by index or name."""
        index = (self.candidates.index(index_or_name) if isinstance(index_or_name, str)
                 else int(index_or_name))
        return getattr(self, self.candidate_attributes[index])

    def build(self, input_shape):
        channels = input_shape[-1]
        for name in self.candidates:
            if name.startswith("gn_") and channels % int(name[3:]):
                raise CandidateError(
                    f"RNA candidate '{name}' needs the channels to divide by {name[3:]}; layer "
                    f"'{self.name}' has {channels} channels")
        self.choice = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                      trainable=False, name="choice")
        for attribute in self.candidate_attributes:
            getattr(self, attribute).build(input_shape)

    def call(self, inputs, training=None, mode: str | None = None):
        def branch(index):
            layer = self.candidate(index)
            if self.candidates[index] == "bn":
                return lambda: layer(inputs, training=training, mode=mode)
            return lambda: layer(inputs)

        if self.num_candidates == 1:
            return branch(0)()
        # An index out of range would run the last branch (switch_case's default); the
        # setters check the range instead of paying for an assert on every call.
        return tf.switch_case(tf.convert_to_tensor(self.choice),
                              [branch(i) for i in range(self.num_candidates)])

    def get_config(self):
        return {**super().get_config(), "candidates": list(self.candidates),
                "momentum": self.momentum, "epsilon": self.epsilon,
                "synchronized": self.synchronized}
