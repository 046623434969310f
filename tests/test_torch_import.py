"""PyTorch state dicts into resnet18 / wrn34: imported random weights give the logits of the
PyTorch networks.

PyTorch is not installed here, so the expected logits come from a numpy transcription of
the released forwards (RNA's model/resnet.py, TRADES' models/wideresnet.py) in float64, NCHW,
with PyTorch's conv padding and eval-mode BatchNorm2d (eps 1e-5), on state dicts whose
names and shapes this file lists by itself, module by module as the PyTorch classes create
them. Narrow networks (ResNet-18 width 2: 2/4/8/16 filters; WRN-34 width 1: 16/16/32/64) on
8x8 images: the released avg_pool2d(4) / (8) is the global mean of the final map at 32x32,
so the reference pools globally. Tolerance: float32 against float64 through 18-34 layers,
|difference| <= 1e-4 x the largest |logit|.
"""

from __future__ import annotations

import json
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf

from madry_ns import config as config_lib
from madry_ns import models, torch_import
from madry_ns.errors import UserError

SIZE = 8
CLASSES = 10
MEAN, STD = np.array([0.5, 0.45, 0.4]), np.array([0.25, 0.2, 0.3])


# ----------------------------------------------------------------------------------------
# State dicts as the PyTorch modules name them


def _conv_w(rng, out, inp, k):
    return rng.normal(0, np.sqrt(2.0 / (k * k * out)), (out, inp, k, k))


def _plain_bn_state(rng, prefix, c):
    return {prefix + "weight": rng.uniform(0.5, 1.5, c), prefix + "bias": rng.normal(0, 0.2, c),
            prefix + "running_mean": rng.normal(0, 0.2, c),
            prefix + "running_var": rng.uniform(0.5, 1.5, c),
            prefix + "num_batches_tracked": np.array(391, np.int64)}


def _usnorm_state(rng, prefix, c, norm_list):
    """RNA's USNorm(c, norm_list): `norm.<k>` is BatchNorm2d for 'bn', else a GroupNorm."""
    sd = {}
    for k, name in enumerate(norm_list):
        if name == "bn":
            sd.update(_plain_bn_state(rng, f"{prefix}norm.{k}.", c))
        else:
            sd[f"{prefix}norm.{k}.weight"] = rng.uniform(0.5, 1.5, c)
            sd[f"{prefix}norm.{k}.bias"] = rng.normal(0, 0.2, c)
    return sd


def resnet18_state(width=2, seed=0, norm_list=None):
    """kuangliu's ResNet(BasicBlock, [2, 2, 2, 2]) with `width` stem filters (64 released);
    with `norm_list`, RNA's ResNet18(norm_list): every BatchNorm2d a USNorm."""
    rng = np.random.default_rng(seed)

    def _bn_state(rng, prefix, c):
        return (_usnorm_state(rng, prefix, c, norm_list) if norm_list
                else _plain_bn_state(rng, prefix, c))

    sd = {"conv1.weight": _conv_w(rng, width, 3, 3), **_bn_state(rng, "bn1.", width)}
    in_planes = width
    for s, planes in enumerate([width, 2 * width, 4 * width, 8 * width], start=1):
        for i, stride in enumerate([1 if s == 1 else 2, 1]):
            p = f"layer{s}.{i}."
            sd[p + "conv1.weight"] = _conv_w(rng, planes, in_planes, 3)
            sd.update(_bn_state(rng, p + "bn1.", planes))
            sd[p + "conv2.weight"] = _conv_w(rng, planes, planes, 3)
            sd.update(_bn_state(rng, p + "bn2.", planes))
            if stride != 1 or in_planes != planes:
                sd[p + "shortcut.0.weight"] = _conv_w(rng, planes, in_planes, 1)
                sd.update(_bn_state(rng, p + "shortcut.1.", planes))
            in_planes = planes
    sd["linear.weight"] = rng.normal(0, 0.3, (CLASSES, 8 * width))
    sd["linear.bias"] = rng.normal(0, 0.3, CLASSES)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def wrn_state(widen=1, seed=1, sub_block1=True, norm_list=None):
    """TRADES' WideResNet(depth=34, widen_factor) including its unused `sub_block1`; with
    `norm_list`, RNA's WideResNet32(norm_list): the blocks' norms are USNorms, the final
    BatchNorm2d stays."""
    rng = np.random.default_rng(seed)

    def _bn_state(rng, prefix, c):
        return (_usnorm_state(rng, prefix, c, norm_list) if norm_list
                else _plain_bn_state(rng, prefix, c))

    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    sd = {"conv1.weight": _conv_w(rng, 16, 3, 3)}
    groups = [("block1", ch[0], ch[1]), ("block2", ch[1], ch[2]), ("block3", ch[2], ch[3])]
    if sub_block1:
        groups.insert(1, ("sub_block1", ch[0], ch[1]))
    for group, in_planes, out_planes in groups:
        for i in range(5):
            p, inp = f"{group}.layer.{i}.", in_planes if i == 0 else out_planes
            sd.update(_bn_state(rng, p + "bn1.", inp))
            sd[p + "conv1.weight"] = _conv_w(rng, out_planes, inp, 3)
            sd.update(_bn_state(rng, p + "bn2.", out_planes))
            sd[p + "conv2.weight"] = _conv_w(rng, out_planes, out_planes, 3)
            if inp != out_planes:
                sd[p + "convShortcut.weight"] = _conv_w(rng, out_planes, inp, 1)
    sd.update(_plain_bn_state(rng, "bn1.", ch[3]))
    sd["fc.weight"] = rng.normal(0, 0.3, (CLASSES, ch[3]))
    sd["fc.bias"] = rng.normal(0, 0.3, CLASSES)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------
# The PyTorch forwards in numpy (eval mode)


def conv2d(x, w, stride, padding):
    """nn.Conv2d(bias=False): x (N, C, H, W), w (O, C, k, k), zero padding on every side."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (x.shape[2] + 2 * padding - k) // stride + 1
    wo = (x.shape[3] + 2 * padding - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            rows = slice(i, i + stride * (ho - 1) + 1, stride)
            cols = slice(j, j + stride * (wo - 1) + 1, stride)
            out += np.einsum("nchw,oc->nohw", xp[:, :, rows, cols], w[:, :, i, j])
    return out


def batch_norm(x, sd, prefix, path=None, eps=1e-5):
    """nn.BatchNorm2d in eval mode (running statistics); for a USNorm (`prefix + 'norm.k'`),
    the candidate `next(path)`: its BatchNorm2d, or GroupNorm(C, C), i.e. each sample's and
    channel's own mean and biased variance over H x W, then the affine map."""
    if prefix + "weight" not in sd:
        prefix = f"{prefix}norm.{next(path)}."
        if prefix + "running_mean" not in sd:
            mean = x.mean(axis=(2, 3), keepdims=True)
            var = x.var(axis=(2, 3), keepdims=True)
            w, b = (sd[prefix + n].astype(np.float64)[None, :, None, None]
                    for n in ("weight", "bias"))
            return (x - mean) / np.sqrt(var + eps) * w + b

    def c(name):
        return sd[prefix + name].astype(np.float64)[None, :, None, None]
    return (x - c("running_mean")) / np.sqrt(c("running_var") + eps) * c("weight") + c("bias")


def relu(x):
    return np.maximum(x, 0)


def resnet18_forward(sd, x, path=None):
    """RNA's ResNet forward; `path`: the candidate of each USNorm in forward order."""
    path = iter(path or [])
    w = {k: v.astype(np.float64) for k, v in sd.items()}

    def norm(y, prefix):
        return batch_norm(y, sd, prefix, path)

    out = relu(norm(conv2d(x, w["conv1.weight"], 1, 1), "bn1."))
    for s in range(1, 5):
        for i in range(2):
            p, stride = f"layer{s}.{i}.", 2 if (s > 1 and i == 0) else 1
            o = relu(norm(conv2d(out, w[p + "conv1.weight"], stride, 1), p + "bn1."))
            o = norm(conv2d(o, w[p + "conv2.weight"], 1, 1), p + "bn2.")
            if p + "shortcut.0.weight" in w:
                out = norm(conv2d(out, w[p + "shortcut.0.weight"], stride, 0), p + "shortcut.1.")
            out = relu(out + o)
    return out.mean(axis=(2, 3)) @ w["linear.weight"].T + w["linear.bias"]


def wrn_forward(sd, x, path=None):
    """TRADES' / RNA's WideResNet forward; `path` as resnet18_forward's."""
    path = iter(path or [])
    w = {k: v.astype(np.float64) for k, v in sd.items()}

    def norm(y, prefix):
        return batch_norm(y, sd, prefix, path)

    out = conv2d(x, w["conv1.weight"], 1, 1)
    for b, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(5):
            p, st = f"block{b}.layer.{i}.", stride if i == 0 else 1
            if p + "convShortcut.weight" in w:  # not equalInOut: x is replaced by relu(bn1(x))
                out = relu(norm(out, p + "bn1."))
                o = relu(norm(conv2d(out, w[p + "conv1.weight"], st, 1), p + "bn2."))
                out = conv2d(out, w[p + "convShortcut.weight"], st, 0) + \
                    conv2d(o, w[p + "conv2.weight"], 1, 1)
            else:
                o = relu(norm(out, p + "bn1."))
                o = relu(norm(conv2d(o, w[p + "conv1.weight"], st, 1), p + "bn2."))
                out = out + conv2d(o, w[p + "conv2.weight"], 1, 1)
    out = relu(norm(out, "bn1."))
    return out.mean(axis=(2, 3)) @ w["fc.weight"].T + w["fc.bias"]


def _images(n=4, seed=3):
    """0-255 NHWC images for the toolkit, and the same as PyTorch's 0-1 NCHW tensors."""
    x = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)
    return x, np.transpose(x.astype(np.float64) / 255.0, (0, 3, 1, 2))


def _assert_logits(got, want):
    scale = np.abs(want).max()
    assert scale > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def _model(cls, width, normalization):
    keras.utils.set_random_seed(0)
    return cls(width=width, input_shape=(SIZE, SIZE, 3), input_normalization=normalization,
               input_mean=MEAN, input_std=STD).build_for_input()


# ----------------------------------------------------------------------------------------
# Logits


def test_resnet18_imports_rnas_layout_with_channel_normalization():
    sd = resnet18_state()
    model = _model(models.ResNet18, 2, "channel")
    torch_import.assign_state_dict(model, sd)
    x255, x01 = _images()
    want = resnet18_forward(sd, (x01 - MEAN[None, :, None, None]) / STD[None, :, None, None])
    _assert_logits(model(tf.constant(x255)).numpy(), want)


def test_wrn34_imports_trades_layout_with_no_normalization():
    sd = wrn_state()
    model = _model(models.WRN34, 1, "none")
    torch_import.assign_state_dict(model, sd)
    x255, x01 = _images()
    _assert_logits(model(tf.constant(x255)).numpy(), wrn_forward(sd, x01))


def _rna_model(cls, width):
    keras.utils.set_random_seed(0)
    return cls(width=width, input_shape=(SIZE, SIZE, 3), input_normalization="channel",
               input_mean=MEAN, input_std=STD, norm_layer="rna",
               rna_candidates=["bn", "in"]).build_for_input()


@pytest.mark.parametrize("arch", ["resnet18", "wrn34"])
def test_rna_usnorm_state_dicts_give_the_logits_of_each_path(arch):
    # The released norm_list ['bn', 'gnr_1'] (BatchNorm2d, GroupNorm(C, C)) is ["bn", "in"].
    cls, width, state, forward = {
        "resnet18": (models.ResNet18, 2, resnet18_state, resnet18_forward),
        "wrn34": (models.WRN34, 1, wrn_state, wrn_forward)}[arch]
    sd = state(norm_list=["bn", "gnr_1"], **({"sub_block1": False} if arch == "wrn34" else {}))
    model = _rna_model(cls, width)
    torch_import.assign_state_dict(model, sd)
    x255, x01 = _images()
    x_in = (x01 - MEAN[None, :, None, None]) / STD[None, :, None, None]
    layers = len(model.rna_layers())
    for path in ([0] * layers, [(i * 7 // 3) % 2 for i in range(layers)]):
        model.set_path(path)
        _assert_logits(model(tf.constant(x255)).numpy(), forward(sd, x_in, path))
    # Refused on the settings, before any variable is read: a plain-BN model.
    with pytest.raises(UserError, match="holds RNA's USNorm layers .* not 'bn'"):
        torch_import.assign_state_dict(cls(width=width, input_normalization="none"), sd)
    if arch == "resnet18":  # candidates in another order than the released norm_list
        swapped = cls(width=width, input_shape=(SIZE, SIZE, 3), input_normalization="none",
                      norm_layer="rna", rna_candidates=["in", "bn"]).build_for_input()
        with pytest.raises(UserError, match="missing 'bn1.norm.1.running_mean'"):
            torch_import.assign_state_dict(swapped, sd)


# ----------------------------------------------------------------------------------------
# Files


def write_safetensors(path, state):
    """The format by its description: u64 LE header size, JSON header, raw LE bytes."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, value in state.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": names[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_and_npz_read_the_same_arrays(tmp_path):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "a.half": np.array([1.5, -2.0], np.float16),
             "a.num_batches_tracked": np.array(7, np.int64)}
    write_safetensors(tmp_path / "s.safetensors", {f"module.{k}": v for k, v in state.items()})
    np.savez(tmp_path / "s.npz", **state)
    for name in ("s.safetensors", "s.npz"):
        read = torch_import.read_state_dict(str(tmp_path / name))
        assert sorted(read) == sorted(state), name  # DataParallel's module. prefix dropped
        for key, value in state.items():
            assert read[key].dtype == value.dtype and read[key].shape == value.shape
            np.testing.assert_array_equal(read[key], value)


def test_bfloat16_safetensors_become_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact in bfloat16
    text = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw)
    np.testing.assert_array_equal(
        torch_import.read_state_dict(str(tmp_path / "b.safetensors"))["w"], values)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "shorter than its 8-byte header length"),
    (lambda b: struct.pack("<Q", 10 ** 9) + b[8:], "exceeds the file"),
    (lambda b: b[:-4], "do not fit its size or the file"),
    (lambda b: b[:8] + b"[" + b[9:], "the header is not JSON"),
])
def test_damaged_safetensors_are_refused(tmp_path, damage, message):
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"w": np.zeros((2, 2), np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        torch_import.read_state_dict(str(path))


def test_pt_files_need_pytorch_and_other_files_are_refused(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not read")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs PyTorch, which is not installed"):
            torch_import.read_state_dict(str(tmp_path / "w.pt"))
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(UserError, match="expected a .safetensors, .npz, .pt or .pth"):
        torch_import.read_state_dict(str(tmp_path / "w.h5"))
    (tmp_path / "p.npz").write_bytes(b"PK not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        torch_import.read_state_dict(str(tmp_path / "p.npz"))


# ----------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def small_resnet():
    return _model(models.ResNet18, 2, "channel")


def test_state_dicts_that_do_not_fit_are_refused_before_any_assignment(small_resnet):
    before = [v.numpy().copy() for v in small_resnet.variables]
    sd = resnet18_state()
    missing = {k: v for k, v in sd.items() if k != "layer2.0.shortcut.0.weight"}
    with pytest.raises(UserError, match="missing 'layer2.0.shortcut.0.weight' "
                       r"\(shape \[4, 2, 1, 1\]\)"):
        torch_import.assign_state_dict(small_resnet, missing)
    wrong = {**sd, "linear.weight": np.zeros((10, 17), np.float32)}
    with pytest.raises(UserError, match=r"'linear.weight' has shape \[10, 17\], the model "
                       r"expects \[10, 16\]"):
        torch_import.assign_state_dict(small_resnet, wrong)
    extra = {**sd, "layer5.0.conv1.weight": np.zeros(1, np.float32)}
    with pytest.raises(UserError, match="1 names the ResNet18 layout does not have: "
                       "'layer5.0.conv1.weight'"):
        torch_import.assign_state_dict(small_resnet, extra)
    for var, value in zip(small_resnet.variables, before):
        np.testing.assert_array_equal(var.numpy(), value)


def test_normalize_buffers_must_match_the_models_constants(small_resnet):
    sd = resnet18_state()
    torch_import.assign_state_dict(small_resnet, {**sd, "normalize.mean": MEAN.astype(
        np.float32), "normalize.std": STD.astype(np.float32)})
    with pytest.raises(UserError, match="set input_normalization 'channel' with these"):
        torch_import.assign_state_dict(small_resnet, {
            **sd, "normalize.mean": np.array([0.4914, 0.4822, 0.4465], np.float32),
            "normalize.std": np.array([0.2471, 0.2435, 0.2616], np.float32)})


def test_models_the_weights_cannot_mean_anything_in_are_refused():
    sd = wrn_state(sub_block1=False)
    # Refused on their settings alone, before any variable is read (so never built here).
    with pytest.raises(UserError, match="'per_image' is Madry's TensorFlow standardization"):
        torch_import.assign_state_dict(models.WRN34(width=1), sd)
    with pytest.raises(UserError, match="bn_epsilon 0.001"):
        torch_import.assign_state_dict(models.WRN34(
            width=1, input_normalization="none", bn_epsilon=1e-3), sd)
    with pytest.raises(UserError, match="holds BatchNorm2d layers: set norm_layer 'bn', not"):
        torch_import.assign_state_dict(models.ResNet18(
            width=2, input_normalization="none", norm_layer="rna"), sd)
    with pytest.raises(UserError, match="not MadryWRN"):
        torch_import.assign_state_dict(models.MadryWRN(
            width=1, input_shape=(SIZE, SIZE, 3), input_normalization="none"), sd)


# ----------------------------------------------------------------------------------------
# The command


def test_command_writes_a_model_dir_that_loads_with_the_pytorch_logits(tmp_path):
    import madry_ns

    sd = wrn_state(seed=4)
    write_safetensors(tmp_path / "wrn.safetensors", sd)
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps({"dataset": "digits"}))
    out = str(tmp_path / "imported")
    argv = [str(tmp_path / "wrn.safetensors"), "--arch", "wrn34", "--out", out,
            "--config", str(config_path), "--input_normalization", "none"]
    assert torch_import.main(argv) == 0
    saved = config_lib.load(str(tmp_path / "imported" / "config.json"))
    assert (saved.model, saved.model_width, saved.input_normalization, saved.model_dir) == \
        ("wrn34", 1, "none", out)
    model = madry_ns.load_model(out)
    x = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    want = wrn_forward(sd, np.transpose(x.astype(np.float64) / 255, (0, 3, 1, 2)))
    _assert_logits(model(tf.constant(x)).numpy(), want)
    # The weights know nothing of their input scale; the config.json beside them does.
    with pytest.raises(UserError, match="trained on inputs normalized as .*'none'"):
        madry_ns.checkpoints.load_weights(models.WRN34(width=1),
                                          madry_ns.checkpoints.latest_checkpoint(out))
    with pytest.raises(SystemExit) as refused:  # an existing checkpoint is not overwritten
        torch_import.main(argv)
    assert refused.value.code == 2
