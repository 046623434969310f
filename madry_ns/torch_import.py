"""PyTorch state dicts of the RNA code's ResNet-18 and of TRADES' (and RNA's) WRN-34-10 into
the toolkit's `resnet18` and `wrn34`, without PyTorch.

    python -m madry_ns.torch_import STATE --arch wrn34 --out models/trades \\
        --input_normalization none [--config CONFIG] [--set KEY=VALUE ...]

reads STATE (`.safetensors` or `.npz` always; `.pt`/`.pth` only where PyTorch is installed),
builds the model the config describes at the width and class count the state dict has, copies
every weight and BN statistic, and writes `models/trades/checkpoint-0` with its `config.json`
(`checkpoints.save_weights`): eval.py, the evaluation suite, `madry_ns.load_model` and
`init_checkpoint` read it like a trained model_dir.

Layouts (the module names of the released code; checked against the toolkit's models):

* `resnet18`, kuangliu's ResNet-18 as the RNA code (`model/resnet.py`) has it: `conv1`,
  `bn1`, `layer<s>.<i>.{conv1,bn1,conv2,bn2}`, the projection shortcut
  `layer<s>.<i>.shortcut.{0,1}` (1x1 conv, BN) where the shape changes, `linear`. The
  toolkit's `ResNet18` has the same post-activation blocks, shortcut convs and padding.
* `wrn34`, TRADES' `models/wideresnet.py` (and RNA's `model/wide_resnet.py`): `conv1`,
  `block<s>.layer.<i>.{bn1,conv1,bn2,conv2}`, `convShortcut` where the channels change, the
  final `bn1` and `fc`. The toolkit's `WRN34` has the same pre-activation blocks (BN-ReLU
  before each conv; the 1x1 shortcut takes the activated input, the identity the raw one).
  TRADES' network also builds `sub_block1`, a fourth block group its forward never calls:
  its weights are skipped.
* RNA's random-norm networks (`USNorm`: one module per candidate, `<module>.norm.<k>.*`)
  go into a model with `norm_layer` 'rna' whose `rna_candidates` are the released
  `norm_list` in its order, in the toolkit's names: the README command's ['bn', 'gnr_1'] is
  ["bn", "in"] (GroupNorm(C, C) with affine is the toolkit's 'in'), 'gn_<g>' is
  GroupNorm(g, C) and 'ln' 'gn_1'. A BN candidate has running statistics and a group norm
  has none, so an order that swaps them is refused; the group norms among themselves hold
  the same shapes and cannot be told apart: their order is the config's. (PyTorch's plain
  'in', InstanceNorm2d without affine, has no toolkit candidate.) A state dict holds no path:
  the imported model starts on path 0.

Conversions: conv weights OIHW -> HWIO, linear weights (out, in) -> (in, out); BatchNorm2d's
weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance
(`num_batches_tracked` is skipped). PyTorch's BN momentum 0.1 is Keras' 0.9 and its eps
1e-5 the models' default; a config that changes either is refused. A `module.` prefix
(nn.DataParallel, as RNA saves) is dropped, and a `.pt` holding {'state_dict': ...} (RNA's
`model.pth`) is unwrapped.

Input scale: the toolkit's models take 0-255 images, PyTorch's take ToTensor's 0-1 ones, so
the model needs `input_normalization` 'none' (TRADES: no normalization) or 'channel' with
the training constants (RNA: CIFAR-10's mean and std, the default `input_mean`/`input_std`);
'per_image' is refused. RNA's evaluation model carries its constants as `normalize.mean`
and `normalize.std`: they must equal the config's.

Deviations and limits: the global average pool equals the released `avg_pool2d` (4 for
ResNet-18, 8 for WRN) on 32x32 inputs only; PyTorch's running_var is the unbiased batch
variance and further Keras training updates it with the biased one (a factor n/(n-1)).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from madry_ns import cli
from madry_ns.errors import UserError

ARCHS = ("resnet18", "wrn34")
# Keys of the released networks that hold nothing the forward uses.
_SKIPPED_SUFFIXES = (".num_batches_tracked",)
_SKIPPED_PREFIXES = ("sub_block1.",)  # TRADES' WideResNet builds it and never calls it
_NORMALIZE_KEYS = ("normalize.mean", "normalize.std")  # RNA's NormalizeByChannelMeanStd
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
                       "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
# A header larger than this is not a state dict's (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


class StateDictError(UserError):
    """A state dict that does not fit the model, or a file that cannot be read."""


# ---------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str) -> dict:
    """name -> numpy array of a state dict file: `.safetensors` (parsed here), `.npz`
    (`allow_pickle=False`) or `.pt`/`.pth` (PyTorch's `torch.load(weights_only=True)`, only
    if PyTorch is importable). A `module.` prefix on every name is dropped."""
    if not os.path.isfile(path):
        raise StateDictError(f"state dict '{path}' does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        state = read_safetensors(path)
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                state = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as e:
            raise StateDictError(f"'{path}' is not a readable .npz archive of arrays: {e}") \
                from None
    elif ext in (".pt", ".pth"):
        state = _read_torch(path)
    else:
        raise StateDictError(f"state dict '{path}': expected a .safetensors, .npz, .pt or .pth "
                             f"file, got '{ext or 'no extension'}'")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: value for name, value in state.items()}
    return state


def read_safetensors(path: str) -> dict:
    """The tensors of a `.safetensors` file: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes. bfloat16
    becomes float32. Offsets and sizes are checked against the file before any is read."""
    with open(path, "rb") as f:
        data = f.read()
    where = f"safetensors file '{path}'"
    if len(data) < 8:
        raise StateDictError(f"{where} is shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise StateDictError(f"{where}: header length {size} exceeds the file ({len(data)} "
                             f"bytes); truncated or not safetensors")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateDictError(f"{where}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise StateDictError(f"{where}: the header is not a JSON object")
    body = memoryview(data)[8 + size:]
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), \
                info["data_offsets"]
            kind = np.dtype(_SAFETENSORS_DTYPES[dtype])
        except (KeyError, TypeError, ValueError):
            raise StateDictError(f"{where}: tensor '{name}' has an unreadable entry {info} "
                                 f"(dtypes read: {', '.join(_SAFETENSORS_DTYPES)})") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(body)) or end - begin != count * kind.itemsize:
            raise StateDictError(f"{where}: tensor '{name}' ({dtype} {shape}) has data offsets "
                                 f"[{begin}, {end}] that do not fit its size or the file")
        array = np.frombuffer(body[begin:end], dtype=kind).reshape(shape)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        state[name] = array
    return state


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise StateDictError(
            f"'{path}' is a PyTorch pickle: reading it needs PyTorch, which is not installed "
            f"here. Convert it where PyTorch is, e.g. python -c \"import numpy, torch; "
            f"s = torch.load('{path}', map_location='cpu', weights_only=True); "
            f"s = s.get('state_dict', s); numpy.savez('state.npz', "
            f"**{{k: v.numpy() for k, v in s.items()}})\", and import state.npz") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        raise StateDictError(f"'{path}' cannot be read by torch.load(weights_only=True): "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # RNA's model.pth: {'state_dict', 'opt', ...}
    if not isinstance(loaded, dict):
        raise StateDictError(f"'{path}' holds a {type(loaded).__name__}, not a state dict")
    state = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise StateDictError(f"'{path}': entry '{name}' is a {type(value).__name__}, not a "
                                 f"tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        state[name] = value.numpy()
    return state


# ---------------------------------------------------------------------------------------
# The layouts


def _bn(module: str, layer) -> list:
    return [(f"{module}.weight", layer.gamma, "vector"), (f"{module}.bias", layer.beta, "vector"),
            (f"{module}.running_mean", layer.moving_mean, "vector"),
            (f"{module}.running_var", layer.moving_variance, "vector")]


def _norm(module: str, layer) -> list:
    """A BatchNorm2d, or RNA's `USNorm`: one module per candidate under `<module>.norm.<k>`,
    in the order of the model's `rna_candidates` (BN with statistics, the group norms with
    weight and bias only)."""
    from madry_ns.layers import RandomNorm

    if not isinstance(layer, RandomNorm):
        return _bn(module, layer)
    entries = []
    for k, name in enumerate(layer.candidates):
        candidate = layer.candidate(k)
        if name == "bn":
            entries += _bn(f"{module}.norm.{k}", candidate)
        else:
            entries += [(f"{module}.norm.{k}.weight", candidate.gamma, "vector"),
                        (f"{module}.norm.{k}.bias", candidate.beta, "vector")]
    return entries


def _conv(module: str, layer) -> list:
    return [(f"{module}.weight", layer.kernel, "conv")]


def _linear(module: str, layer) -> list:
    return [(f"{module}.weight", layer.kernel, "linear"), (f"{module}.bias", layer.bias,
                                                           "vector")]


def layout(model) -> list:
    """[(PyTorch name, Keras variable, kind)] for a `ResNet18` or `WRN34`, kind one of
    'conv', 'linear', 'vector' (how the array is converted)."""
    from madry_ns import models

    entries = []
    if isinstance(model, models.ResNet18):
        entries += _conv("conv1", model.init_conv) + _norm("bn1", model.init_bn)
        for name in model.block_names:  # block_<s>_<i> is layer<s>.<i>
            s, i = name.split("_")[1:]
            block, prefix = getattr(model, name), f"layer{s}.{i}"
            entries += _conv(f"{prefix}.conv1", block.conv1) + _norm(f"{prefix}.bn1", block.bn1)
            entries += _conv(f"{prefix}.conv2", block.conv2) + _norm(f"{prefix}.bn2", block.bn2)
            if block.projection:
                entries += _conv(f"{prefix}.shortcut.0", block.shortcut_conv)
                entries += _norm(f"{prefix}.shortcut.1", block.shortcut_bn)
        return entries + _linear("linear", model.logit)
    if isinstance(model, models.WRN34):
        entries += _conv("conv1", model.init_conv)
        for name in model.block_names:  # block_<s>_<i> is block<s>.layer.<i>
            s, i = name.split("_")[1:]
            block, prefix = getattr(model, name), f"block{s}.layer.{i}"
            entries += _norm(f"{prefix}.bn1", block.bn1) + _conv(f"{prefix}.conv1", block.conv1)
            entries += _norm(f"{prefix}.bn2", block.bn2) + _conv(f"{prefix}.conv2", block.conv2)
            if not block.equal_in_out:
                entries += _conv(f"{prefix}.convShortcut", block.shortcut_conv)
        return entries + _bn("bn1", model.final_bn) + _linear("fc", model.logit)
    raise TypeError(f"no PyTorch layout for {type(model).__name__}")


def _to_keras(array, kind):
    if kind == "conv":
        return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "linear":
        return np.transpose(array)  # (out, in) -> (in, out)
    return array


def _torch_shape(shape, kind):
    if kind == "conv":
        return [shape[3], shape[2], shape[0], shape[1]]
    if kind == "linear":
        return [shape[1], shape[0]]
    return list(shape)


def _check_model(model):
    from madry_ns import models

    if not isinstance(model, (models.ResNet18, models.WRN34)):
        raise StateDictError(f"PyTorch state dicts are read into the toolkit's "
                             f"{' and '.join(ARCHS)} models, not {type(model).__name__}")
    if model.input_normalization == "per_image":
        raise StateDictError(
            "input_normalization 'per_image' is Madry's TensorFlow standardization; the "
            "PyTorch networks were trained on 0-1 images: set input_normalization 'none' "
            "(TRADES) or 'channel' with the training mean and std (RNA: CIFAR-10's, the "
            "default input_mean/input_std)")
    for name, value, torch_value in (("bn_momentum", model.bn_momentum, 0.9),
                                     ("bn_epsilon", model.bn_epsilon, 1e-5)):
        if value != torch_value:
            raise StateDictError(f"{name} {value}: PyTorch's BatchNorm2d defaults (momentum "
                                 f"0.1, i.e. Keras 0.9, and eps 1e-5) are what the released "
                                 f"networks use; expected {torch_value}")


def _check_normalize(model, state):
    found = [key for key in _NORMALIZE_KEYS if key in state]
    if not found:
        return
    mean = np.asarray(state.get("normalize.mean", []), np.float64).ravel()
    std = np.asarray(state.get("normalize.std", []), np.float64).ravel()
    if model.input_normalization != "channel" or not (
            mean.shape == std.shape == (len(model.input_mean),)
            and np.allclose(mean, model.input_mean, rtol=0, atol=1e-6)
            and np.allclose(std, model.input_std, rtol=0, atol=1e-6)):
        raise StateDictError(
            f"the state dict normalizes its 0-1 input per channel (normalize.mean "
            f"{mean.round(6).tolist()}, normalize.std {std.round(6).tolist()}); the model has "
            f"input_normalization '{model.input_normalization}'"
            + (f" with input_mean {list(model.input_mean)}, input_std {list(model.input_std)}"
               if model.input_normalization == "channel" else "")
            + ": set input_normalization 'channel' with these input_mean and input_std")


def assign_state_dict(model, state: dict, source: str = "the state dict") -> None:
    """Copy every weight and BN statistic of a PyTorch state dict into a built `ResNet18` or
    `WRN34` (module docstring: layouts, conversions, refusals). Every model variable must be
    found with its shape and every name of the state dict used (or known to be unused);
    nothing is assigned before all of that is checked."""
    _check_model(model)
    rna = next((name for name in state if ".norm." in name), None)
    if (rna is not None) != (model.norm_layer == "rna"):
        raise StateDictError(
            f"{source} " + (f"holds RNA's USNorm layers (names like '{rna}'): set norm_layer "
                            f"'rna' with the released candidates in their order"
                            if rna else "holds BatchNorm2d layers: set norm_layer 'bn'")
            + f", not '{model.norm_layer}'")
    _check_normalize(model, state)
    entries = layout(model)
    values, problems = [], []
    for name, variable, kind in entries:
        if name not in state:
            problems.append(f"missing '{name}' (shape "
                            f"{_torch_shape(variable.shape, kind)})")
            continue
        array = np.asarray(state[name])
        want = _torch_shape(variable.shape, kind)
        if list(array.shape) != want:
            problems.append(f"'{name}' has shape {list(array.shape)}, the model expects {want}")
            continue
        if not np.issubdtype(array.dtype, np.floating):
            problems.append(f"'{name}' has dtype {array.dtype}, expected floating point")
            continue
        values.append((variable, _to_keras(array, kind).astype(variable.dtype)))
    used = {name for name, _, _ in entries} | set(_NORMALIZE_KEYS)
    unexpected = sorted(name for name in state if name not in used
                        and not name.endswith(_SKIPPED_SUFFIXES)
                        and not name.startswith(_SKIPPED_PREFIXES))
    if unexpected:
        problems.append(f"{len(unexpected)} names the {type(model).__name__} layout does not "
                        f"have: " + ", ".join(f"'{n}'" for n in unexpected[:5])
                        + (" ..." if len(unexpected) > 5 else ""))
    if problems:
        raise StateDictError(f"{source} does not fit the toolkit's {type(model).__name__} "
                             f"(width {model.width}, {model.num_classes} classes):\n  - "
                             + "\n  - ".join(problems[:12]))
    for variable, value in values:
        variable.assign(value)


def infer_width(state: dict, arch: str) -> tuple[int, int]:
    """(model_width, num_classes) of a state dict: ResNet-18's width is its stem's filters
    (64 released), WRN's the first group's filters / 16 (10 released)."""
    try:
        if arch == "resnet18":
            width, classes = state["conv1.weight"].shape[0], state["linear.weight"].shape[0]
        elif arch == "wrn34":
            filters = state["block1.layer.0.conv1.weight"].shape[0]
            if filters % 16:
                raise StateDictError(f"WRN's first block has {filters} filters, not a multiple "
                                     f"of 16")
            width, classes = filters // 16, state["fc.weight"].shape[0]
        else:
            raise StateDictError(f"--arch must be one of {', '.join(ARCHS)}, got '{arch}'")
    except KeyError as e:
        raise StateDictError(f"not a {arch} state dict: it has no '{e.args[0]}' (names found: "
                             f"{', '.join(sorted(state)[:6])} ...)") from None
    return int(width), int(classes)


def build_imported(state: dict, arch: str, config, source: str = "the state dict"):
    """The toolkit model of `config` (its dataset's image shape, its input normalization),
    as `arch` at the state dict's width, with the state dict's weights; and that config
    (model and model_width set)."""
    from madry_ns import data, models

    width, classes = infer_width(state, arch)
    config = config.replace(model=arch, model_width=width)
    if data.num_classes(config) != classes:
        raise StateDictError(f"{source} has {classes} output classes; the config's dataset "
                             f"'{config.dataset}' has {data.num_classes(config)}")
    model = models.build_model(config)
    assign_state_dict(model, state, source)
    return model, config


def _main(config, args):
    from madry_ns import checkpoints

    if checkpoints.latest_checkpoint(args.out) is not None:  # before the minutes of a build
        raise StateDictError(f"'{args.out}' already holds a checkpoint "
                             f"({checkpoints.latest_checkpoint(args.out)}); choose an empty "
                             f"--out")
    state = read_state_dict(args.state)
    model, config = build_imported(state, args.arch, config, source=f"'{args.state}'")
    path = checkpoints.save_weights(args.out, model, config)
    print(f"Imported {args.state} as {args.arch} (width {config.model_width}, input "
          f"normalization '{config.input_normalization}') into {path}")
    return 0


def main(argv=None) -> int:
    parser = cli.Parser("python -m madry_ns.torch_import", __doc__, _main)
    parser.add_argument("state", help="the state dict: .safetensors, .npz, or .pt/.pth "
                        "(with PyTorch installed)")
    parser.add_argument("--arch", required=True, choices=ARCHS,
                        help="resnet18 (RNA's kuangliu layout) or wrn34 (TRADES' WRN-34-10)")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                        help="an empty model_dir for checkpoint-0 and its config.json")
    parser.add_override("--input_normalization", "input_normalization",
                        choices=("none", "channel"),
                        help="the network's input: none (0-1 images, TRADES) or channel "
                             "(mean/std of the config, CIFAR-10's by default: RNA); "
                             "default: the config's")
    return cli.run(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
