"""Models: Madry's wide ResNet (cifar10_challenge `model.py`), ResNet-20, and the PyTorch
ResNet-18 and WRN-34-10 of the RNA code (UniSerj/Random-Norm-Aggregation, `model/`).

Every model takes float images on Madry's 0-255 scale, standardizes each image inside the
model (as Madry does, so epsilon keeps its meaning), returns logits, and is called as
``model(x, bn_mode=...)``, where `bn_mode` is one of `layers.BN_MODES` and reaches every
normalization layer explicitly (Keras does not forward custom keywords by itself). Without
`bn_mode`, Keras' `training` flag decides: True is `batch_update`, otherwise `population`.

Every model takes `norm_layer`: "bn" (batch norm) or "rna" (`layers.RandomNorm` in place of
each batch norm, with `rna_candidates`); `model.rna_layers()`, `model.resample(seed)`,
`model.set_path(...)` and `model.path()` select the random path (see `_Classifier`).

`model.tf1_variables()` maps Madry's TF1 variable names (`unit_1_0/sub1/conv1/DW`, ...) onto
the Keras variables, for reading and writing Madry's checkpoints.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from madry_ns.layers import RNA_DEFAULT_CANDIDATES, BatchNorm, RandomNorm, resolve_mode

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
RNA_SAMPLING = ("per_layer", "network")


def norm_factory(norm_layer: str = "bn", rna_candidates=RNA_DEFAULT_CANDIDATES,
                 epsilon: float = 1e-3):
    """`norm(name) -> layer` for the normalization layers a model replaces with RNA.

    "bn": `BatchNorm` (momentum 0.9, `epsilon`: Madry's 1e-3, PyTorch's 1e-5); "rna":
    `RandomNorm(rna_candidates)` with the released code's PyTorch constants (momentum 0.1,
    i.e. Keras 0.9, eps 1e-5) whatever the model's own BN epsilon.
    """
    if norm_layer == "bn":
        return lambda name: BatchNorm(epsilon=epsilon, name=name)
    if norm_layer == "rna":
        candidates = tuple(rna_candidates)
        return lambda name: RandomNorm(candidates, name=name)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


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

    def __init__(self, in_filter, out_filter, stride, activate_before_residual, norm=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        self.activate_before_residual = activate_before_residual
        norm = norm or norm_factory()
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


    def _norms(self, width, norm_layer, rna_candidates, epsilon=1e-3):
        """Record the constructor's width and norm settings; the norm layer factory."""
        self.width = width
        self.norm_layer, self.rna_candidate_names = norm_layer, tuple(rna_candidates)
        return norm_factory(norm_layer, rna_candidates, epsilon)

    def get_config(self):
        return {"width": self.width, "norm_layer": self.norm_layer,
                "rna_candidates": list(self.rna_candidate_names)}

    # ----- Random Normalization Aggregation: the path -----
    # A path is the int32 vector of the active candidate of every RNA layer, in forward
    # order. Sampling is stateless in an explicit seed, so it runs inside compiled functions
    # (a training step resamples twice without leaving the graph) and repeats under a seed.

    rna_sampling = "per_layer"  # build_model sets the config's `rna_sampling`

    def rna_layers(self) -> list[RandomNorm]:
        """Every `RandomNorm` layer, in forward order."""
        return [layer for layer in self._sublayers() if isinstance(layer, RandomNorm)]

    def rna_candidates(self) -> tuple:
        """The candidate names every RNA layer shares (empty without RNA layers)."""
        layers = self.rna_layers()
        names = {layer.candidates for layer in layers}
        if len(names) > 1:
            raise ValueError(f"RNA layers with different candidates: {sorted(names)}")
        return names.pop() if names else ()

    def num_paths(self, sampling: str | None = None) -> int:
        """How many paths `resample` can draw: candidates^layers per layer, candidates for
        one type for the whole network ("network"); 1 without RNA layers."""
        sampling = self._sampling(sampling)
        n, layers = len(self.rna_candidates()), len(self.rna_layers())
        if not layers:
            return 1
        return n if sampling == "network" else n ** layers

    def path(self) -> tf.Tensor:
        """The active path: int32 [num RNA layers], candidate indices."""
        layers = self.rna_layers()
        if not layers:
            return tf.zeros([0], tf.int32)
        return tf.stack([tf.convert_to_tensor(layer.choice) for layer in layers])

    def path_names(self) -> list[str]:
        """The active path as candidate names (eager)."""
        return [layer.candidates[int(c)] for layer, c in zip(self.rna_layers(), self.path())]

    def sample_path(self, seed, sampling: str | None = None) -> tf.Tensor:
        """A uniformly random path, a function of `seed` (two integers) only: per layer
        independently ("per_layer", the released `--mixed`) or one candidate for every
        layer ("network"). Nothing is assigned."""
        sampling = self._sampling(sampling)
        layers = self.rna_layers()
        if not layers:
            return tf.zeros([0], tf.int32)
        n = len(self.rna_candidates())
        seed = tf.cast(seed, tf.int64)
        if sampling == "network":
            one = tf.random.stateless_uniform([], seed, minval=0, maxval=n, dtype=tf.int32)
            return tf.fill([len(layers)], one)
        return tf.random.stateless_uniform([len(layers)], seed, minval=0, maxval=n,
                                           dtype=tf.int32)

    def resample(self, seed, sampling: str | None = None) -> tf.Tensor:
        """Draw a path with `sample_path(seed, sampling)`, make it active, return it.
        Works eagerly and inside tf.functions; assigning variables never retraces."""
        path = self.sample_path(seed, sampling)
        self._assign_path(path)
        return path

    def set_path(self, choices) -> None:
        """Fix the path: one candidate name for every layer ("bn"), or one entry per RNA
        layer (names or indices, a list or an int tensor)."""
        layers = self.rna_layers()
        if isinstance(choices, str):
            choices = [choices] * len(layers)
        if isinstance(choices, (list, tuple)):
            if len(choices) != len(layers):
                raise ValueError(f"a path needs {len(layers)} choices (one per RNA layer), "
                                 f"got {len(choices)}")
            indices = []
            for layer, choice in zip(layers, choices):
                if isinstance(choice, str):
                    if choice not in layer.candidates:
                        raise ValueError(f"{choice!r} is not a candidate of {layer.name} "
                                         f"{list(layer.candidates)}")
                    choice = layer.candidates.index(choice)
                if not 0 <= int(choice) < layer.num_candidates:
                    raise ValueError(f"choice {choice} out of range for {layer.name} "
                                     f"({layer.num_candidates} candidates)")
                indices.append(int(choice))
            choices = tf.constant(indices, tf.int32)
        else:
            choices = tf.cast(choices, tf.int32)
            n = len(self.rna_candidates())
            tf.debugging.assert_equal(tf.size(choices), len(layers), "one choice per RNA layer")
            tf.debugging.assert_non_negative(choices, "RNA choices must be >= 0")
            tf.debugging.assert_less(choices, n, f"RNA choices must be < {n}")
        self._assign_path(choices)

    def _assign_path(self, choices):
        layers = self.rna_layers()
        if layers:
            for layer, choice in zip(layers, tf.unstack(choices, num=len(layers))):
                layer.choice.assign(choice)

    def _sampling(self, sampling):
        sampling = sampling or self.rna_sampling
        if sampling not in RNA_SAMPLING:
            raise ValueError(f"RNA sampling must be one of {RNA_SAMPLING}, got {sampling!r}")
        return sampling

    def bn_layers(self) -> list[BatchNorm]:
        """Every BatchNorm layer, in forward order."""
        return [layer for layer in self._sublayers() if isinstance(layer, BatchNorm)]

    weight_decay_on = "kernels"  # build_model sets the config's `weight_decay_variables`

    def decay_variables(self) -> list:
        """The variables weight decay covers: conv and dense kernels only (Madry's), or
        every trainable variable with `weight_decay_on = "all"` (PyTorch SGD's weight_decay,
        as the RNA code trains)."""
        if self.weight_decay_on == "all":
            return list(self.trainable_variables)
        return [layer.kernel for layer in self._sublayers()
                if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


class MadryWRN(_Classifier):
    """Madry's WRN-34 (model.py): 3 stages of 5 pre-activation units, leaky ReLU 0.1.

    width=10 gives Madry's filters 16/160/320/640 and 45,901,914 trainable parameters;
    width=1 the narrow 16/16/32/64 variant Madry's code comments mention.
    """

    def __init__(self, width: int = 10, num_classes: int = 10, norm_layer: str = "bn",
                 rna_candidates=RNA_DEFAULT_CANDIDATES, **kwargs):
        super().__init__(**kwargs)
        norm = self._norms(width, norm_layer, rna_candidates)
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
                                               norm=norm, name=name))
                self.unit_names.append(name)
        # Stays a BatchNorm with RNA, as the final BN of the released WRN.
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


class _BasicBlock(keras.layers.Layer):
    """ResNet basic block, BN before activation; option-A shortcut (stride + zero pad)."""

    def __init__(self, in_filter, out_filter, stride, norm=None, **kwargs):
        super().__init__(**kwargs)
        self.in_filter, self.out_filter, self.stride = in_filter, out_filter, stride
        norm = norm or norm_factory()
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


class ResNet20(_Classifier):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 x width.

    BN sits before each activation, as in the fragile-features study. About 0.27 M
    parameters at width 1.
    """

    def __init__(self, width: int = 1, num_classes: int = 10, norm_layer: str = "bn",
                 rna_candidates=RNA_DEFAULT_CANDIDATES, **kwargs):
        super().__init__(**kwargs)
        norm = self._norms(width, norm_layer, rna_candidates)
        filters = [16 * width, 32 * width, 64 * width]
        self.init_conv = _conv(filters[0], 1, "init_conv", _HE_INIT)
        self.init_bn = norm("init_bn")
        self.block_names = []
        in_f = filters[0]
        for s, f in enumerate(filters):
            for i in range(3):
                stride = 2 if (s > 0 and i == 0) else 1
                name = f"block_{s + 1}_{i}"
                setattr(self, name, _BasicBlock(in_f, f, stride, norm=norm, name=name))
                self.block_names.append(name)
                in_f = f
        self.logit = keras.layers.Dense(num_classes, name="logit")

    def forward(self, x, bn_mode):
        x = tf.nn.relu(self.init_bn(self.init_conv(x), mode=bn_mode))
        for name in self.block_names:
            x = getattr(self, name)(x, bn_mode=bn_mode)
        return self.logit(tf.reduce_mean(x, axis=[1, 2]))


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


class _PostActivationBlock(keras.layers.Layer):
    """ResNet-18's BasicBlock (RNA `model/resnet.py`): conv-norm-ReLU-conv-norm, plus the
    shortcut (1x1 conv + norm where the shape changes), then ReLU."""

    def __init__(self, in_filter, out_filter, stride, norm, **kwargs):
        super().__init__(**kwargs)
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


class ResNet18(_Classifier):
    """ResNet-18 for CIFAR as the RNA code (`model/resnet.py`, the kuangliu layout).

    Stem conv3x3 (stride 1) + norm + ReLU, four stages of two post-activation basic blocks
    with `width`, 2, 4, 8 x `width` filters (strides 1, 2, 2, 2; 1x1-conv shortcuts), global
    average pooling (the released avg_pool 4 on the 4x4 map) and a linear layer. 20 norm
    layers: with RNA over two candidates, 2^20 paths. width=64 is the released network
    (11,173,962 parameters with BN); width=8 (8/16/32/64) is a CPU-sized variant.

    Init as released: convs kaiming_normal fan_out, linear N(0, 0.001) with zero bias, norm
    scales 1 and offsets 0.
    """

    def __init__(self, width: int = 64, num_classes: int = 10, norm_layer: str = "bn",
                 rna_candidates=RNA_DEFAULT_CANDIDATES, **kwargs):
        super().__init__(**kwargs)
        norm = self._norms(width, norm_layer, rna_candidates, epsilon=1e-5)
        self.init_conv = TorchConv2D(width, 3, 1, name="init_conv")
        self.init_bn = norm("init_bn")
        self.block_names = []
        in_f = width
        for s, f in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                name = f"block_{s + 1}_{i}"
                stride = 2 if (s > 0 and i == 0) else 1
                setattr(self, name, _PostActivationBlock(in_f, f, stride, norm, name=name))
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


class _PreActivationBlock(keras.layers.Layer):
    """WRN-34-10's BasicBlock (RNA `model/wide_resnet.py`, as TRADES'): norm-ReLU-conv-
    norm-ReLU-conv; where the shape changes, the shortcut is a 1x1 conv of the activated
    input, otherwise the identity of the raw input. No dropout (dropRate 0)."""

    def __init__(self, in_filter, out_filter, stride, norm, **kwargs):
        super().__init__(**kwargs)
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


class WRN34(_Classifier):
    """The WRN-34-10 of the RNA code (its "WideResNet32"; TRADES' network).

    Stem conv3x3(16), three stages of five pre-activation blocks with 16, 32, 64 x `width`
    filters (strides 1, 2, 2), a final norm + ReLU, global average pooling and a linear
    layer. With RNA, bn1 and bn2 of the 15 blocks become RNA layers (30 layers, 2^30 paths)
    and the final norm stays a BatchNorm, as released. width=10 is the released network
    (46,160,474 parameters with BN). The activation is ReLU (Madry's WRN uses leaky ReLU
    0.1 and avg-pool/zero-pad shortcuts).

    Init as released: convs normal(0, sqrt(2 / (k*k*out))), norm scales 1 and offsets 0,
    linear weights PyTorch's default U(+-1/sqrt(fan_in)) with zero bias.
    """

    def __init__(self, width: int = 10, num_classes: int = 10, norm_layer: str = "bn",
                 rna_candidates=RNA_DEFAULT_CANDIDATES, **kwargs):
        super().__init__(**kwargs)
        norm = self._norms(width, norm_layer, rna_candidates, epsilon=1e-5)
        filters = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = TorchConv2D(16, 3, 1, name="init_conv")
        self.block_names = []
        for s in range(3):
            for i in range(5):
                name = f"block_{s + 1}_{i}"
                in_f = filters[s] if i == 0 else filters[s + 1]
                stride = (1, 2, 2)[s] if i == 0 else 1
                setattr(self, name, _PreActivationBlock(in_f, filters[s + 1], stride, norm,
                                                        name=name))
                self.block_names.append(name)
        self.final_bn = BatchNorm(epsilon=1e-5, name="final_bn")
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


def build_model(config) -> _Classifier:
    """The model a config names, with its variables created (seeded by the caller).

    With `precision` mixed_*, every layer computes in float16/bfloat16 and keeps float32
    variables (BN statistics included); the policy is set for construction only.
    """
    from madry_ns.errors import ConfigError
    from madry_ns.layers import CandidateError

    width = config.model_width or STANDARD_WIDTH[config.model]
    if config.model not in MODEL_CLASSES:  # config validation makes this unreachable
        raise ValueError(f"unknown model {config.model!r}")
    previous = keras.config.dtype_policy()
    if config.precision != "float32":
        keras.config.set_dtype_policy(config.precision)
    try:
        model = MODEL_CLASSES[config.model](width=width, norm_layer=config.norm_layer,
                                            rna_candidates=config.rna_candidates)
    finally:
        keras.config.set_dtype_policy(previous)
    model.rna_sampling = config.rna_sampling
    model.weight_decay_on = config.weight_decay_variables
    if config.bn_sync == "synchronized" and config.distribution != "none":
        for bn in model.bn_layers():  # before the first call: statistics over all replicas
            bn.synchronized = True
    try:
        return model.build_for_input()
    except CandidateError as e:
        raise ConfigError(f"key 'rna_candidates' has value {config.rna_candidates}: {e}") \
            from None
