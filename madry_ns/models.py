"""Models: Madry's wide ResNet (cifar10_challenge `model.py`) and ResNet-20.

Every model takes float images on Madry's 0-255 scale, standardizes each image inside the
model (as Madry does, so epsilon keeps its meaning), returns logits, and is called as
``model(x, bn_mode=...)``, where `bn_mode` is one of `layers.BN_MODES` and reaches every
normalization layer explicitly (Keras does not forward custom keywords by itself). Without
`bn_mode`, Keras' `training` flag decides: True is `batch_update`, otherwise `population`.

`model.tf1_variables()` maps Madry's TF1 variable names (`unit_1_0/sub1/conv1/DW`, ...) onto
the Keras variables, for reading and writing Madry's checkpoints.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from madry_ns.layers import BatchNorm, resolve_mode

# Madry: tf.random_normal_initializer(stddev=sqrt(2 / (k*k*out_filters))), untruncated.
_MADRY_CONV_INIT = dict(scale=2.0, mode="fan_out", distribution="untruncated_normal")
# Madry: tf.uniform_unit_scaling_initializer(factor=1.0) = U(+-sqrt(3 / fan_in)).
_MADRY_DENSE_INIT = dict(scale=1.0, mode="fan_in", distribution="uniform")
_HE_INIT = dict(scale=2.0, mode="fan_in", distribution="untruncated_normal")
STANDARD_WIDTH = {"madry_wrn": 10, "resnet20": 1}


def _lrelu(x):
    # Madry's tf.where(x < 0, 0.1 x, x). Same forward; the gradient differs only at exactly
    # x == 0 (1 there vs 0.1 here), a set of measure zero after batch normalization.
    return tf.nn.leaky_relu(x, alpha=0.1)


def _conv(filters, stride, name, init):
    return keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                               kernel_initializer=keras.initializers.VarianceScaling(**init),
                               name=name)


def _pad_channels(x, out_filters):
    pad = (out_filters - x.shape[-1]) // 2
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [pad, pad]])


class _MadryUnit(keras.layers.Layer):
    """Madry's `_residual`: pre-activation unit with avg-pool + zero-pad shortcut."""

    def __init__(self, in_filter, out_filter, stride, activate_before_residual, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self.activate_before_residual = activate_before_residual
        self.bn1 = BatchNorm(name="bn1")
        self.conv1 = _conv(out_filter, stride, "conv1", _MADRY_CONV_INIT)
        self.bn2 = BatchNorm(name="bn2")
        self.conv2 = _conv(out_filter, 1, "conv2", _MADRY_CONV_INIT)

    def call(self, x, bn_mode):
        if self.activate_before_residual:  # scope 'shared_activation'
            x = _lrelu(self.bn1(x, mode=bn_mode))
            orig_x = x
        else:  # scope 'residual_only_activation'
            orig_x = x
            x = _lrelu(self.bn1(x, mode=bn_mode))
        x = self.conv1(x)
        x = self.conv2(_lrelu(self.bn2(x, mode=bn_mode)))
        if self.in_filter != self.out_filter:
            orig_x = tf.nn.avg_pool2d(orig_x, self.stride, self.stride, "VALID")
            orig_x = _pad_channels(orig_x, self.out_filter)
        return x + orig_x

    def tf1_variables(self, scope):
        first = "shared_activation" if self.activate_before_residual else \
            "residual_only_activation"
        return {**_bn_tf1(self.bn1, f"{scope}/{first}/BatchNorm"),
                f"{scope}/sub1/conv1/DW": self.conv1.kernel,
                **_bn_tf1(self.bn2, f"{scope}/sub2/BatchNorm"),
                f"{scope}/sub2/conv2/DW": self.conv2.kernel}


def _bn_tf1(bn, scope):
    return {f"{scope}/gamma": bn.gamma, f"{scope}/beta": bn.beta,
            f"{scope}/moving_mean": bn.moving_mean,
            f"{scope}/moving_variance": bn.moving_variance}


class _Classifier(keras.Model):
    """Shared plumbing: 0-255 input, per-image standardization, BN-mode resolution.

    Subclasses define `forward(x, bn_mode)` on the standardized images.
    """

    def call(self, x, training=None, bn_mode=None):
        bn_mode = resolve_mode(bn_mode, training)
        x = tf.image.per_image_standardization(tf.cast(x, self.compute_dtype))
        logits = self.forward(x, bn_mode)
        # Float32 logits under mixed precision: losses and attack gradients stay accurate.
        return tf.cast(logits, tf.float32) if logits.dtype.size < 4 else logits

    def build_for_input(self):
        """Create the variables by running one image through the network."""
        self(tf.zeros([1, 32, 32, 3]), bn_mode="population")
        return self

    def _sublayers(self) -> list:
        """Every nested layer, depth first in creation order, which for these models is the
        forward order. (Keras' `_flatten_layers` reverses the children of nested layers:
        it gave block_1_0/bn2 before block_1_0/bn1.)"""
        found, stack = [], list(reversed(self._layers))
        while stack:  # a list, not a generator: AutoGraph cannot convert generators
            layer = stack.pop()
            found.append(layer)
            stack.extend(reversed(layer._layers))
        return found

    def bn_layers(self) -> list[BatchNorm]:
        """Every BatchNorm layer, in forward order."""
        return [layer for layer in self._sublayers() if isinstance(layer, BatchNorm)]

    def decay_variables(self) -> list:
        """The variables Madry's weight decay covers: conv and dense kernels only."""
        return [layer.kernel for layer in self._sublayers()
                if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


class MadryWRN(_Classifier):
    """Madry's WRN-34 (model.py): 3 stages of 5 pre-activation units, leaky ReLU 0.1.

    width=10 gives Madry's filters 16/160/320/640 and 45,901,914 trainable parameters;
    width=1 the narrow 16/16/32/64 variant Madry's code comments mention.
    """

    def __init__(self, width: int = 10, num_classes: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        filters = [16, 16 * width, 32 * width, 64 * width]
        strides = [1, 2, 2]
        self.init_conv = _conv(16, 1, "init_conv", _MADRY_CONV_INIT)
        self.unit_names = []
        for s in range(3):
            for i in range(5):
                in_f = filters[s] if i == 0 else filters[s + 1]
                name = f"unit_{s + 1}_{i}"
                # Attributes, not a list: TF checkpoints track named attributes only.
                setattr(self, name, _MadryUnit(in_f, filters[s + 1], strides[s] if i == 0 else 1,
                                               activate_before_residual=(s == 0 and i == 0),
                                               name=name))
                self.unit_names.append(name)
        self.final_bn = BatchNorm(name="final_bn")
        self.logit = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.VarianceScaling(
                **_MADRY_DENSE_INIT), bias_initializer="zeros", name="logit")

    def forward(self, x, bn_mode):
        x = self.init_conv(x)
        for name in self.unit_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        x = _lrelu(self.final_bn(x, mode=bn_mode))
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))

    def tf1_variables(self) -> dict:
        """Madry's TF1 checkpoint names -> variables (model_reference §3.3)."""
        names = {"input/init_conv/DW": self.init_conv.kernel}
        for name in self.unit_names:
            names.update(getattr(self, name).tf1_variables(name))
        names.update(_bn_tf1(self.final_bn, "unit_last/BatchNorm"))
        names.update({"logit/DW": self.logit.kernel, "logit/biases": self.logit.bias})
        return names

    def get_config(self):
        return {"width": self.width}


class _BasicBlock(keras.layers.Layer):
    """ResNet basic block, BN before activation; option-A shortcut (stride + zero pad)."""

    def __init__(self, in_filter, out_filter, stride, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self.conv1 = _conv(out_filter, stride, "conv1", _HE_INIT)
        self.bn1 = BatchNorm(name="bn1")
        self.conv2 = _conv(out_filter, 1, "conv2", _HE_INIT)
        self.bn2 = BatchNorm(name="bn2")

    def call(self, x, bn_mode):
        shortcut = x
        x = tf.nn.relu(self.bn1(self.conv1(x), mode=bn_mode))
        x = self.bn2(self.conv2(x), mode=bn_mode)
        if self.stride != 1 or self.in_filter != self.out_filter:
            shortcut = _pad_channels(shortcut[:, ::self.stride, ::self.stride, :],
                                     self.out_filter)
        return tf.nn.relu(x + shortcut)


class ResNet20(_Classifier):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 x width.

    BN sits before each activation, as in the fragile-features study. About 0.27 M
    parameters at width 1.
    """

    def __init__(self, width: int = 1, num_classes: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        filters = [16 * width, 32 * width, 64 * width]
        self.init_conv = _conv(filters[0], 1, "init_conv", _HE_INIT)
        self.init_bn = BatchNorm(name="init_bn")
        self.block_names = []
        in_f = filters[0]
        for s, f in enumerate(filters):
            for i in range(3):
                stride = 2 if (s > 0 and i == 0) else 1
                name = f"block_{s + 1}_{i}"
                setattr(self, name, _BasicBlock(in_f, f, stride, name=name))
                self.block_names.append(name)
                in_f = f
        self.logit = keras.layers.Dense(num_classes, name="logit")

    def forward(self, x, bn_mode):
        x = tf.nn.relu(self.init_bn(self.init_conv(x), mode=bn_mode))
        for name in self.block_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))

    def get_config(self):
        return {"width": self.width}


def build_model(config) -> _Classifier:
    """The model a config names, with its variables created (seeded by the caller).

    With `precision` mixed_*, every layer computes in float16/bfloat16 and keeps float32
    variables (BN statistics included); the policy is set for construction only.
    """
    width = config.model_width or STANDARD_WIDTH[config.model]
    previous = keras.config.dtype_policy()
    if config.precision != "float32":
        keras.config.set_dtype_policy(config.precision)
    try:
        if config.model == "madry_wrn":
            model = MadryWRN(width=width)
        elif config.model == "resnet20":
            model = ResNet20(width=width)
        else:  # config validation makes this unreachable
            raise ValueError(f"unknown model {config.model!r}")
    finally:
        keras.config.set_dtype_policy(previous)
    if config.bn_sync == "synchronized" and config.distribution != "none":
        for bn in model.bn_layers():  # before the first call: statistics over all replicas
            bn.synchronized = True
    return model.build_for_input()
