"""Models: Madry's wide ResNet (cifar10_challenge `model.py`), ResNet-20, and the PyTorch
ResNet-18 and WRN-34-10 of the RNA code (UniSerj/Random-Norm-Aggregation, `model/`).

Every model takes float images on Madry's 0-255 scale (so epsilon keeps its meaning),
normalizes them inside the model as `input_normalization` says (`INPUT_NORMALIZATIONS`:
Madry's per-image standardization by default; channel mean/std or plain x / 255 for the
PyTorch models' conventions), returns logits, and is called as
``model(x, bn_mode=...)``, where `bn_mode` is one of `layers.BN_MODES` and reaches every
normalization layer explicitly (Keras does not forward custom keywords by itself). Without
`bn_mode`, Keras' `training` flag decides: True is `batch_update`, otherwise `population`.

Every model takes `norm_layer`: "bn" (batch norm) or "rna" (`layers.RandomNorm` in place of
each batch norm, with `rna_candidates`); `model.rna_layers()`, `model.resample(seed)`,
`model.set_path(...)` and `model.path()` select the random path (`rna_paths.RandomPaths`,
which every model inherits).

Every setting is a constructor argument (width, num_classes, input_shape, norm_layer,
rna_candidates, rna_sampling, bn_epsilon, bn_momentum, synchronized, weight_decay_on,
input_normalization, input_mean, input_std; see
`_Classifier`), `get_config()` returns them all and `cls.from_config(model.get_config())`
rebuilds the model. Every model and layer class is registered with Keras (package
"madry_ns"), so after `import madry_ns`, `keras.saving.load_model("m.keras")` restores a
model saved with `model.save("m.keras")` (README, "Models as Keras files"). `first_conv()` and `logit_layer()` name the parts
fine-tuning selects (`finetune.trainable_variables`).

`model.tf1_variables()` maps Madry's TF1 variable names (`unit_1_0/sub1/conv1/DW`, ...) onto
the Keras variables, for reading and writing Madry's checkpoints.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from madry_ns.config import CIFAR10_MEAN, CIFAR10_STD, INPUT_NORMALIZATIONS
from madry_ns.layers import RNA_DEFAULT_CANDIDATES, BatchNorm, RandomNorm, resolve_mode
from madry_ns.rna_paths import RNA_SAMPLING, RandomPaths

# Madry: tf.random_normal_initializer(stddev=sqrt(2 / (k*k*out_filters))), untruncated.
_MADRY_CONV_INIT = dict(scale=2.0, mode="fan_out", distribution="untruncated_normal")
# Madry: tf.uniform_unit_scaling_initializer(factor=1.0) = U(+-sqrt(3 / fan_in)).
_MADRY_DENSE_INIT = dict(scale=1.0, mode="fan_in", distribution="uniform")
_HE_INIT = dict(scale=2.0, mode="fan_in", distribution="untruncated_normal")
# PyTorch's kaiming_normal_(mode='fan_out') (ResNet-18) and normal(0, sqrt(2 / (k*k*out)))
# (WRN-34-10) are the same draw: Madry's.
_TORCH_CONV_INIT = _MADRY_CONV_INIT
# PyTorch's default nn.Linear weight, kaiming_uniform_(a=sqrt(5)) = U(+-1 / sqrt(fan_in)).
_TORCH_DENSE_INIT = dict(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")
# Widths: the factor of madry_wrn, resnet20 and wrn34; resnet18's first-stage filters.
STANDARD_WIDTH = {"madry_wrn": 10, "resnet20": 1, "resnet18": 64, "wrn34": 10}
NORM_LAYERS = ("bn", "rna")
# INPUT_NORMALIZATIONS, what the model does to its 0-255 input before the first layer:
# * per_image: Madry's tf.image.per_image_standardization (the toolkit's default);
# * channel: (x / 255 - mean) / std per channel, the constants on the 0-1 scale (RNA's
#   ResNet-18 and WRN, many RobustBench models: torchvision's Normalize after ToTensor;
#   CIFAR10_MEAN and CIFAR10_STD by default, RNA's utils.py constants);
# * none: x / 255 only, the 0-1 input of TRADES' WRN-34-10 (ToTensor, no Normalize).


def norm_factory(norm_layer: str = "bn", rna_candidates=RNA_DEFAULT_CANDIDATES,
                 epsilon: float = 1e-3, momentum: float = 0.9, synchronized: bool = False):
    """`norm(name) -> layer` for the normalization layers a model replaces with RNA.

    "bn": `BatchNorm(momentum, epsilon)` (Madry's epsilon 1e-3, PyTorch's 1e-5); "rna":
    `RandomNorm(rna_candidates)` with the released code's PyTorch constants (momentum 0.1,
    i.e. Keras 0.9, eps 1e-5) whatever the model's own BN settings. `synchronized` reaches
    every batch norm (RNA's BN candidates too): statistics over all replicas.
    """
    if norm_layer == "bn":
        return lambda name: BatchNorm(momentum=momentum, epsilon=epsilon,
                                      synchronized=synchronized, name=name)
    if norm_layer == "rna":
        candidates = tuple(rna_candidates)
        return lambda name: RandomNorm(candidates, synchronized=synchronized, name=name)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def _norm(settings):
    """The norm factory of a block's `norm_settings` (norm_factory's keywords)."""
    return norm_factory(**(settings or {}))


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


@keras.saving.register_keras_serializable(package="madry_ns")
class _MadryUnit(keras.layers.Layer):
    """Madry's `_residual`: pre-activation unit with avg-pool + zero-pad shortcut.

    `norm_settings`: `norm_factory`'s keywords (its defaults when None)."""

    def __init__(self, in_filter, out_filter, stride, activate_before_residual,
                 norm_settings=None, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self.activate_before_residual = activate_before_residual
        self._norm_settings = _settings_copy(norm_settings)
        norm = _norm(norm_settings)
        self.bn1 = norm("bn1")
        self.conv1 = _conv(out_filter, stride, "conv1", _MADRY_CONV_INIT)
        self.bn2 = norm("bn2")
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

    def get_config(self):
        return {**super().get_config(), "in_filter": self.in_filter,
                "out_filter": self.out_filter, "stride": self.stride,
                "activate_before_residual": self.activate_before_residual,
                "norm_settings": _settings_copy(self._norm_settings)}

    def tf1_variables(self, scope):
        first = "shared_activation" if self.activate_before_residual else \
            "residual_only_activation"
        return {**_bn_tf1(self.bn1, f"{scope}/{first}/BatchNorm"),
                f"{scope}/sub1/conv1/DW": self.conv1.kernel,
                **_bn_tf1(self.bn2, f"{scope}/sub2/BatchNorm"),
                f"{scope}/sub2/conv2/DW": self.conv2.kernel}


def _bn_tf1(bn, scope):
    if not isinstance(bn, BatchNorm):
        raise ValueError("Madry's TF1 variable names exist for BatchNorm only, not for "
                         f"{type(bn).__name__} layers (norm_layer 'rna')")
    return {f"{scope}/gamma": bn.gamma, f"{scope}/beta": bn.beta,
            f"{scope}/moving_mean": bn.moving_mean,
            f"{scope}/moving_variance": bn.moving_variance}


def _settings_copy(settings):
    """A plain copy of norm settings (lists, not tuples: what a JSON config holds)."""
    settings = dict(settings or {})
    if "rna_candidates" in settings:
        settings["rna_candidates"] = list(settings["rna_candidates"])
    return settings


DEFAULT_INPUT_SHAPE = (32, 32, 3)
WEIGHT_DECAY_ON = ("kernels", "all")


class _Classifier(RandomPaths, keras.Model):
    """Shared plumbing: 0-255 input, input normalization, BN-mode resolution, and
    every setting of a model, which `get_config` returns and `from_config` takes back:

    * `width`, `num_classes`, `input_shape` (height, width, channels of one image);
    * `norm_layer` ("bn" or "rna"), `rna_candidates`, `rna_sampling` (how `resample` draws a
      path: "per_layer" or "network");
    * `bn_epsilon`, `bn_momentum` of the model's batch norms (RNA layers keep the released
      code's constants, see `norm_factory`), `synchronized` (batch statistics over every
      replica of a tf.distribute strategy);
    * `weight_decay_on`: what `decay_variables` covers, "kernels" (Madry) or "all";
    * `input_normalization` (`INPUT_NORMALIZATIONS`: "per_image", Madry's and the default;
      "channel", (x / 255 - input_mean) / input_std with one constant per channel on the
      0-1 scale, CIFAR-10's by default; "none", x / 255). The constants are Python floats,
      not weights: checkpoints hold the same variables whatever the setting, and a model
      saved before the setting existed loads as "per_image".

    Subclasses define `forward(x, bn_mode)` on the normalized images and create their
    layers with `self._norm_factory()` (the norms) and `self._bn(name)` (a BatchNorm that
    stays one with RNA); `first_conv()` and `logit_layer()` name the parts fine-tuning
    selects.
    """

    def __init__(self, width: int = 1, num_classes: int = 10,
                 input_shape=DEFAULT_INPUT_SHAPE, norm_layer: str = "bn",
                 rna_candidates=RNA_DEFAULT_CANDIDATES, rna_sampling: str = "per_layer",
                 bn_epsilon: float = 1e-3, bn_momentum: float = 0.9,
                 synchronized: bool = False, weight_decay_on: str = "kernels",
                 input_normalization: str = "per_image", input_mean=CIFAR10_MEAN,
                 input_std=CIFAR10_STD, **kwargs):
        super().__init__(**kwargs)
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError("input_shape must be (height, width, channels), positive, got "
                             f"{input_shape}")
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")
        if rna_sampling not in RNA_SAMPLING:
            raise ValueError(f"RNA sampling must be one of {RNA_SAMPLING}, got "
                             f"{rna_sampling!r}")
        if weight_decay_on not in WEIGHT_DECAY_ON:
            raise ValueError(f"weight_decay_on must be one of {WEIGHT_DECAY_ON}, got "
                             f"{weight_decay_on!r}")
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got "
                             f"{input_normalization!r}")
        input_mean = tuple(float(m) for m in input_mean)
        input_std = tuple(float(s) for s in input_std)
        if input_normalization == "channel" and not (
                len(input_mean) == len(input_std) == input_shape[-1]
                and min(input_std) > 0):
            raise ValueError(f"input_normalization 'channel' needs one input_mean and one "
                             f"positive input_std per channel ({input_shape[-1]} channels), "
                             f"got mean {list(input_mean)} and std {list(input_std)}")
        self.width, self.num_classes, self.image_shape = int(width), int(num_classes), \
            input_shape
        self.norm_layer, self.rna_candidate_names = norm_layer, tuple(rna_candidates)
        self.rna_sampling = rna_sampling
        self.bn_epsilon, self.bn_momentum = float(bn_epsilon), float(bn_momentum)
        self.synchronized = bool(synchronized)
        self.weight_decay_on = weight_decay_on
        self.input_normalization = input_normalization
        self.input_mean, self.input_std = input_mean, input_std

    def normalize_input(self, x):
        """The network's input from 0-255 images, as `input_normalization` says."""
        x = tf.cast(x, self.compute_dtype)
        if self.input_normalization == "per_image":
            return tf.image.per_image_standardization(x)
        # Scale first, as PyTorch's ToTensor does, then Normalize's (x - mean) / std.
        x = x / tf.constant(255.0, x.dtype)
        if self.input_normalization == "none":
            return x
        mean = tf.constant(self.input_mean, x.dtype)
        std = tf.constant(self.input_std, x.dtype)
        return (x - mean) / std

    def call(self, x, training=None, bn_mode=None):
        bn_mode = resolve_mode(bn_mode, training)
        logits = self.forward(self.normalize_input(x), bn_mode)
        # Float32 logits under mixed precision: losses and attack gradients stay accurate.
        return tf.cast(logits, tf.float32) if logits.dtype.size < 4 else logits

    def build_for_input(self):
        """Create the variables by running one image of `input_shape` through the network."""
        self(tf.zeros([1, *self.image_shape]), bn_mode="population")
        return self

    def get_build_config(self):
        return {"input_shape": [None, *self.image_shape]}

    def build_from_config(self, config):
        # Variables are created in forward order by a forward pass, as build_for_input does.
        del config
        self.build_for_input()

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

    def norm_settings(self) -> dict:
        """`norm_factory`'s keywords for this model's replaceable norms."""
        return {"norm_layer": self.norm_layer, "rna_candidates": list(self.rna_candidate_names),
                "epsilon": self.bn_epsilon, "momentum": self.bn_momentum,
                "synchronized": self.synchronized}

    def _norm_factory(self):
        return norm_factory(**self.norm_settings())

    def _bn(self, name):
        """A BatchNorm with the model's settings that stays one with RNA (a final BN)."""
        return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                         synchronized=self.synchronized, name=name)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_classes": self.num_classes,
                "input_shape": list(self.image_shape), "norm_layer": self.norm_layer,
                "rna_candidates": list(self.rna_candidate_names),
                "rna_sampling": self.rna_sampling, "bn_epsilon": self.bn_epsilon,
                "bn_momentum": self.bn_momentum, "synchronized": self.synchronized,
                "weight_decay_on": self.weight_decay_on,
                "input_normalization": self.input_normalization,
                "input_mean": list(self.input_mean), "input_std": list(self.input_std)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The model of `get_config()`. Its layers are created under the saved dtype policy
        (mixed precision), as `build_model` creates them."""
        del custom_objects
        config = dict(config)
        policy = config.get("dtype")
        previous = keras.config.dtype_policy()
        if policy is not None:
            policy = keras.dtype_policies.deserialize(policy) if isinstance(policy, dict) \
                else keras.dtype_policies.get(policy)
            config["dtype"] = policy
            keras.config.set_dtype_policy(policy)
        try:
            return cls(**config)
        finally:
            keras.config.set_dtype_policy(previous)

    # ----- The parts fine-tuning selects (finetune.py's "bn+logits+conv1") -----

    def first_conv(self) -> keras.layers.Layer:
        """The first convolution, applied to the normalized image."""
        return self.init_conv

    def logit_layer(self) -> keras.layers.Layer:
        """The dense layer that outputs the logits."""
        return self.logit

    def bn_layers(self) -> list[BatchNorm]:
        """Every BatchNorm layer, in forward order."""
        return [layer for layer in self._sublayers() if isinstance(layer, BatchNorm)]

    def decay_variables(self) -> list:
        """The variables weight decay covers: conv and dense kernels only (Madry's), or
        every trainable variable with `weight_decay_on="all"` (PyTorch SGD's weight_decay,
        as the RNA code trains)."""
        if self.weight_decay_on == "all":
            return list(self.trainable_variables)
        return [layer.kernel for layer in self._sublayers()
                if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def is_toolkit_model(model) -> bool:
    """Whether `model` is one of the toolkit's classifiers (as opposed to a plain Keras model
    a user brings)."""
    return isinstance(model, _Classifier)


@keras.saving.register_keras_serializable(package="madry_ns")
class MadryWRN(_Classifier):
    """Madry's WRN-34 (model.py): 3 stages of 5 pre-activation units, leaky ReLU 0.1.

    width=10 gives Madry's filters 16/160/320/640 and 45,901,914 trainable parameters;
    width=1 the narrow 16/16/32/64 variant Madry's code comments mention. BN epsilon 1e-3
    (TF1 contrib batch_norm). Other settings: `_Classifier`.
    """

    def __init__(self, width: int = 10, bn_epsilon: float = 1e-3, **settings):
        super().__init__(width=width, bn_epsilon=bn_epsilon, **settings)
        width, num_classes = self.width, self.num_classes
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
                                               norm_settings=self.norm_settings(),
                                               name=name))
                self.unit_names.append(name)
        # Stays a BatchNorm with RNA, as the final BN of the released WRN.
        self.final_bn = self._bn("final_bn")
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


@keras.saving.register_keras_serializable(package="madry_ns")
class _BasicBlock(keras.layers.Layer):
    """ResNet basic block, BN before activation; option-A shortcut (stride + zero pad)."""

    def __init__(self, in_filter, out_filter, stride, norm_settings=None, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self._norm_settings = _settings_copy(norm_settings)
        norm = _norm(norm_settings)
        self.conv1 = _conv(out_filter, stride, "conv1", _HE_INIT)
        self.bn1 = norm("bn1")
        self.conv2 = _conv(out_filter, 1, "conv2", _HE_INIT)
        self.bn2 = norm("bn2")

    def call(self, x, bn_mode):
        shortcut = x
        x = tf.nn.relu(self.bn1(self.conv1(x), mode=bn_mode))
        x = self.bn2(self.conv2(x), mode=bn_mode)
        if self.stride != 1 or self.in_filter != self.out_filter:
            shortcut = _pad_channels(shortcut[:, ::self.stride, ::self.stride, :],
                                     self.out_filter)
        return tf.nn.relu(x + shortcut)

    def get_config(self):
        return {**super().get_config(), "in_filter": self.in_filter,
                "out_filter": self.out_filter, "stride": self.stride,
                "norm_settings": _settings_copy(self._norm_settings)}


@keras.saving.register_keras_serializable(package="madry_ns")
class ResNet20(_Classifier):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 x width.

    BN sits before each activation, as in the fragile-features study. About 0.27 M
    parameters at width 1. BN epsilon 1e-3. Other settings: `_Classifier`.
    """

    def __init__(self, width: int = 1, bn_epsilon: float = 1e-3, **settings):
        super().__init__(width=width, bn_epsilon=bn_epsilon, **settings)
        width, num_classes, norm = self.width, self.num_classes, self._norm_factory()
        filters = [16 * width, 32 * width, 64 * width]
        self.init_conv = _conv(filters[0], 1, "init_conv", _HE_INIT)
        self.init_bn = norm("init_bn")
        self.block_names = []
        in_f = filters[0]
        for s, f in enumerate(filters):
            for i in range(3):
                stride = 2 if (s > 0 and i == 0) else 1
                name = f"block_{s + 1}_{i}"
                setattr(self, name, _BasicBlock(in_f, f, stride, self.norm_settings(),
                                                     name=name))
                self.block_names.append(name)
                in_f = f
        self.logit = keras.layers.Dense(num_classes, name="logit")

    def forward(self, x, bn_mode):
        x = tf.nn.relu(self.init_bn(self.init_conv(x), mode=bn_mode))
        for name in self.block_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))


@keras.saving.register_keras_serializable(package="madry_ns")
class TorchConv2D(keras.layers.Conv2D):
    """A bias-free k x k convolution padded as PyTorch's `Conv2d(padding=(k-1)//2)`.

    TensorFlow's 'same' pads a stride-2 3x3 convolution on the bottom/right only, so its
    windows are centred one pixel off PyTorch's (and off a 1x1 stride-2 shortcut); the
    explicit symmetric zero padding keeps the released architecture's geometry.
    """

    def __init__(self, filters, kernel_size, strides=1, **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding="valid",
                         use_bias=False, kernel_initializer=keras.initializers.VarianceScaling(
                             **_TORCH_CONV_INIT), **kwargs)

    def call(self, inputs):
        pad = (self.kernel_size[0] - 1) // 2
        if pad:
            inputs = tf.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        # Of the padded input: Keras checks it when building, and a map smaller than the
        # kernel (2x2 under a 3x3) would otherwise be refused though the padding covers it.
        pad = 2 * ((self.kernel_size[0] - 1) // 2)
        shape = list(input_shape)
        for axis in (1, 2):
            shape[axis] = None if shape[axis] is None else shape[axis] + pad
        return super().compute_output_shape(tuple(shape))

    def get_config(self):
        # Padding, bias and initializer are fixed by the class, not arguments.
        config = super().get_config()
        return {key: config[key] for key in ("name", "trainable", "dtype", "filters",
                                             "kernel_size", "strides")}


@keras.saving.register_keras_serializable(package="madry_ns")
class _PostActivationBlock(keras.layers.Layer):
    """ResNet-18's BasicBlock (RNA `model/resnet.py`): conv-norm-ReLU-conv-norm, plus the
    shortcut (1x1 conv + norm where the shape changes), then ReLU."""

    def __init__(self, in_filter, out_filter, stride, norm_settings=None, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self._norm_settings = _settings_copy(norm_settings)
        norm = _norm(norm_settings)
        self.conv1 = TorchConv2D(out_filter, 3, stride, name="conv1")
        self.bn1 = norm("bn1")
        self.conv2 = TorchConv2D(out_filter, 3, 1, name="conv2")
        self.bn2 = norm("bn2")
        self.projection = stride != 1 or in_filter != out_filter
        if self.projection:
            self.shortcut_conv = TorchConv2D(out_filter, 1, stride, name="shortcut_conv")
            self.shortcut_bn = norm("shortcut_bn")

    def call(self, x, bn_mode):
        out = tf.nn.relu(self.bn1(self.conv1(x), mode=bn_mode))
        out = self.bn2(self.conv2(out), mode=bn_mode)
        shortcut = self.shortcut_bn(self.shortcut_conv(x), mode=bn_mode) if self.projection \
            else x
        return tf.nn.relu(out + shortcut)

    def get_config(self):
        return {**super().get_config(), "in_filter": self.in_filter,
                "out_filter": self.out_filter, "stride": self.stride,
                "norm_settings": _settings_copy(self._norm_settings)}


@keras.saving.register_keras_serializable(package="madry_ns")
class ResNet18(_Classifier):
    """ResNet-18 for CIFAR as the RNA code (`model/resnet.py`, the kuangliu layout).

    Stem conv3x3 (stride 1) + norm + ReLU, four stages of two post-activation basic blocks
    with `width`, 2, 4, 8 x `width` filters (strides 1, 2, 2, 2; 1x1-conv shortcuts), global
    average pooling (the released avg_pool 4 on the 4x4 map) and a linear layer. 20 norm
    layers: with RNA over two candidates, 2^20 paths. width=64 is the released network
    (11,173,962 parameters with BN); width=8 (8/16/32/64) is a CPU-sized variant.

    Init as released: convs kaiming_normal fan_out, linear N(0, 0.001) with zero bias, norm
    scales 1 and offsets 0; BN epsilon 1e-5 (PyTorch's). Other settings: `_Classifier`.
    """

    def __init__(self, width: int = 64, bn_epsilon: float = 1e-5, **settings):
        super().__init__(width=width, bn_epsilon=bn_epsilon, **settings)
        width, num_classes, norm = self.width, self.num_classes, self._norm_factory()
        self.init_conv = TorchConv2D(width, 3, 1, name="init_conv")
        self.init_bn = norm("init_bn")
        self.block_names = []
        in_f = width
        for s, f in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                name = f"block_{s + 1}_{i}"
                stride = 2 if (s > 0 and i == 0) else 1
                setattr(self, name, _PostActivationBlock(in_f, f, stride, self.norm_settings(),
                                                              name=name))
                self.block_names.append(name)
                in_f = f
        self.logit = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            bias_initializer="zeros", name="logit")

    def forward(self, x, bn_mode):
        x = tf.nn.relu(self.init_bn(self.init_conv(x), mode=bn_mode))
        for name in self.block_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))


@keras.saving.register_keras_serializable(package="madry_ns")
class _PreActivationBlock(keras.layers.Layer):
    """WRN-34-10's BasicBlock (RNA `model/wide_resnet.py`, as TRADES'): norm-ReLU-conv-
    norm-ReLU-conv; where the shape changes, the shortcut is a 1x1 conv of the activated
    input, otherwise the identity of the raw input. No dropout (dropRate 0)."""

    def __init__(self, in_filter, out_filter, stride, norm_settings=None, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self._norm_settings = _settings_copy(norm_settings)
        norm = _norm(norm_settings)
        self.equal_in_out = in_filter == out_filter
        self.bn1 = norm("bn1")
        self.conv1 = TorchConv2D(out_filter, 3, stride, name="conv1")
        self.bn2 = norm("bn2")
        self.conv2 = TorchConv2D(out_filter, 3, 1, name="conv2")
        if not self.equal_in_out:
            self.shortcut_conv = TorchConv2D(out_filter, 1, stride, name="shortcut_conv")

    def call(self, x, bn_mode):
        activated = tf.nn.relu(self.bn1(x, mode=bn_mode))
        out = tf.nn.relu(self.bn2(self.conv1(activated), mode=bn_mode))
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.shortcut_conv(activated))

    def get_config(self):
        return {**super().get_config(), "in_filter": self.in_filter,
                "out_filter": self.out_filter, "stride": self.stride,
                "norm_settings": _settings_copy(self._norm_settings)}


@keras.saving.register_keras_serializable(package="madry_ns")
class WRN34(_Classifier):
    """The WRN-34-10 of the RNA code (its "WideResNet32"; TRADES' network).

    Stem conv3x3(16), three stages of five pre-activation blocks with 16, 32, 64 x `width`
    filters (strides 1, 2, 2), a final norm + ReLU, global average pooling and a linear
    layer. With RNA, bn1 and bn2 of the 15 blocks become RNA layers (30 layers, 2^30 paths)
    and the final norm stays a BatchNorm, as released. width=10 is the released network
    (46,160,474 parameters with BN). The activation is ReLU (Madry's WRN uses leaky ReLU
    0.1 and avg-pool/zero-pad shortcuts).

    Init as released: convs normal(0, sqrt(2 / (k*k*out))), norm scales 1 and offsets 0,
    linear weights PyTorch's default U(+-1/sqrt(fan_in)) with zero bias; BN epsilon 1e-5.
    Other settings: `_Classifier`.
    """

    def __init__(self, width: int = 10, bn_epsilon: float = 1e-5, **settings):
        super().__init__(width=width, bn_epsilon=bn_epsilon, **settings)
        width, num_classes = self.width, self.num_classes
        filters = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = TorchConv2D(16, 3, 1, name="init_conv")
        self.block_names = []
        for s in range(3):
            for i in range(5):
                name = f"block_{s + 1}_{i}"
                in_f = filters[s] if i == 0 else filters[s + 1]
                stride = (1, 2, 2)[s] if i == 0 else 1
                setattr(self, name, _PreActivationBlock(in_f, filters[s + 1], stride,
                                                        self.norm_settings(), name=name))
                self.block_names.append(name)
        self.final_bn = self._bn("final_bn")
        self.logit = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.VarianceScaling(
                **_TORCH_DENSE_INIT), bias_initializer="zeros", name="logit")

    def forward(self, x, bn_mode):
        x = self.init_conv(x)
        for name in self.block_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        x = tf.nn.relu(self.final_bn(x, mode=bn_mode))
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))


MODEL_CLASSES = {"madry_wrn": MadryWRN, "resnet20": ResNet20, "resnet18": ResNet18,
                 "wrn34": WRN34}


def model_settings(config) -> dict:
    """The constructor keywords of the model a config names (`MODEL_CLASSES[config.model]`).
    Batch norms are synchronized only under a distribution with `bn_sync: synchronized`."""
    return {"width": config.model_width or STANDARD_WIDTH[config.model],
            "norm_layer": config.norm_layer, "rna_candidates": list(config.rna_candidates),
            "rna_sampling": config.rna_sampling,
            "weight_decay_on": config.weight_decay_variables,
            "input_normalization": config.input_normalization,
            "input_mean": list(config.input_mean), "input_std": list(config.input_std),
            "synchronized": config.bn_sync == "synchronized" and config.distribution != "none"}


def build_model(config, input_shape=None, num_classes=None) -> _Classifier:
    """The model a config names, with its variables created (seeded by the caller).

    `input_shape` (height, width, channels) and `num_classes` default to those of the
    config's dataset (`data.image_shape`, `data.num_classes`: CIFAR-10's 32x32x3 and 10
    classes for Madry's config), read without loading the data. With `precision`
    mixed_*, every layer computes in float16/bfloat16 and keeps float32 variables (BN
    statistics included); the policy is set for construction only.
    """
    from madry_ns.errors import ConfigError
    from madry_ns.layers import CandidateError

    if config.model not in MODEL_CLASSES:  # config validation makes this unreachable
        raise ValueError(f"unknown model {config.model!r}")
    if input_shape is None or num_classes is None:
        from madry_ns import data

        input_shape = input_shape or data.image_shape(config)
        num_classes = num_classes or data.num_classes(config)
    if config.input_normalization == "channel":
        for key in ("input_mean", "input_std"):
            if len(getattr(config, key)) != int(input_shape[-1]):
                raise ConfigError(f"key '{key}' has value {getattr(config, key)}: "
                                  f"input_normalization 'channel' needs one value per channel "
                                  f"of the dataset's images ({int(input_shape[-1])})")
    previous = keras.config.dtype_policy()
    if config.precision != "float32":
        keras.config.set_dtype_policy(config.precision)
    try:
        model = MODEL_CLASSES[config.model](
            input_shape=tuple(input_shape), num_classes=num_classes, **model_settings(config))
    finally:
        keras.config.set_dtype_policy(previous)
    try:
        return model.build_for_input()
    except CandidateError as e:
        raise ConfigError(f"key 'rna_candidates' has value {config.rna_candidates}: {e}") \
            from None
