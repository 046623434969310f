"""Checkpoints named as Madry's: `model_dir/checkpoint-<step>` plus the `checkpoint` state file.

`tf.train.latest_checkpoint(model_dir)` therefore keeps working, and the three most recent
are kept (Madry's `Saver(max_to_keep=3)`). A checkpoint holds the model (weights and BN
statistics) and the optimizer (momentum slots and its `iterations`, the one step counter);
data order and random starts are functions of the step, so nothing else is needed to resume.

TensorFlow writes the data files first and replaces the state file atomically last, so a
run killed mid-save still names the previous, complete checkpoint as latest.

Resume order (train.py): 1. the latest checkpoint in model_dir (everything, including the
optimizer and step); 2. otherwise `init_checkpoint` if the config names one (weights and BN
statistics only: fresh optimizer, step 0; `madry_ns.finetune`); 3. otherwise a fresh model.

Madry's own checkpoints (TF1 `Saver`, name-based: `unit_1_0/sub1/conv1/DW`, ... as in
model.py, plus `<var>/Momentum` slots and `global_step`) are read by name into `MadryWRN`;
`load_weights` and `load_model` accept either format.
"""

from __future__ import annotations

import os
import re

import tensorflow as tf

from madry_ns import config as config_lib
from madry_ns import files, models
from madry_ns.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint"
MAX_TO_KEEP = 3
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class Checkpointer:
    """Saves and restores (model, optimizer) in `model_dir`, Madry's names.

    `save_dir` (default model_dir) is where saves go: a non-chief multi-worker task restores
    from model_dir like everyone but saves into a folder of its own. The newest
    `max_to_keep` checkpoints are kept (0: all of them).
    """

    def __init__(self, model_dir: str, model, optimizer, save_dir: str | None = None,
                 max_to_keep: int = MAX_TO_KEEP):
        self.model_dir = model_dir
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, save_dir or model_dir, max_to_keep=max_to_keep or None,
            checkpoint_name=CHECKPOINT_NAME)

    def save(self, step: int) -> str:
        """Write `checkpoint-<step>` and make it the latest."""
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> str | None:
        """Restore the latest checkpoint in model_dir, if any; return its path."""
        path = tf.train.latest_checkpoint(self.model_dir)
        if path is None:
            return None
        restore(self.checkpoint, path)
        return path


def _variable_keys(checkpoint: tf.train.Checkpoint) -> dict:
    """id(variable) -> the key it is saved under ('model/unit_1_0/bn1/gamma')."""
    view = tf.train.TrackableView(checkpoint)
    keys, queue, seen = {}, [((), checkpoint)], set()
    while queue:
        path, obj = queue.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, child in view.children(obj).items():
            if isinstance(child, tf.Variable) or (hasattr(child, "_shared_name")
                                                  and hasattr(child, "shape")):
                keys.setdefault(id(child), "/".join(path + (name,)))
            else:
                queue.append((path + (name,), child))
    return keys


def _saved_shapes(path: str) -> dict:
    """Object path ('model/unit_1_0/bn1/gamma') -> saved shape, read from the checkpoint's own
    object graph. (A variable is stored under its shortest path, which for trainable weights
    runs through the optimizer, so names alone would not find it.)"""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    found, queue, seen = {}, [((), 0)], set()
    while queue:
        names, node_id = queue.pop(0)
        node = graph.nodes[node_id]
        for attribute in node.attributes:  # every path to a variable, not just the first
            if attribute.name == "VARIABLE_VALUE" and attribute.checkpoint_key in shapes:
                found["/".join(names)] = shapes[attribute.checkpoint_key]
        if node_id in seen:
            continue
        seen.add(node_id)
        for child in node.children:
            queue.append((names + (child.local_name,), child.node_id))
    return found


def check_compatible(model, path: str) -> None:
    """Raise CheckpointError naming the first model variable (in model order) that the
    checkpoint at `path` lacks or holds with another shape."""
    saved = _saved_shapes(path)
    keys = _variable_keys(tf.train.Checkpoint(model=model))
    for var in model.weights:
        key = keys.get(id(var))
        if key is None:
            continue
        if key not in saved:
            raise CheckpointError(
                f"checkpoint '{path}' does not match this model: it has no variable '{key}' "
                f"(shape {list(var.shape)}); it was written for another architecture (check "
                f"\"model\" and \"model_width\" in the config)")
        if list(saved[key]) != list(var.shape):
            raise CheckpointError(
                f"checkpoint '{path}' does not match this model: variable '{key}' has shape "
                f"{list(saved[key])} in the checkpoint, the model expects {list(var.shape)} "
                f"(another \"model_width\"?)")


def restore(checkpoint: tf.train.Checkpoint, path: str, partial: bool = False) -> None:
    """Restore `checkpoint` from `path`, turning TensorFlow's errors into one clear message.

    With `partial`, objects the checkpoint holds but `checkpoint` does not (optimizer slots
    when loading a model alone) are ignored; every variable `checkpoint` has must be found.
    """
    if not os.path.exists(path + ".index"):
        raise CheckpointError(f"checkpoint '{path}' not found (no {path}.index)")
    try:
        check_compatible(checkpoint.model, path)
        status = checkpoint.read(path)
        status.assert_existing_objects_matched()
        if partial:
            status.expect_partial()
    except (tf.errors.OpError, IndexError) as e:  # IndexError: a truncated data file
        raise CheckpointError(f"checkpoint '{path}' cannot be read; it may be truncated or "
                              f"corrupted ({type(e).__name__}: {str(e)[:300]})") from None
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"checkpoint '{path}' does not match this model "
                              f"(another architecture or width?): {str(e)[:600]}") from None


def is_madry_tf1(path: str) -> bool:
    """Whether `path` is a TF1 name-based checkpoint (Madry's `Saver`, fetch_model.py).

    TF2 object-based checkpoints (ours) always hold the object graph; name-based ones never
    do, so this also recognizes a TF1 checkpoint that lacks some of Madry's variables.
    """
    try:
        return OBJECT_GRAPH_KEY not in dict(tf.train.list_variables(path))
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read; it may be truncated or "
                              f"corrupted ({type(e).__name__})") from None


def load_weights(model, path: str) -> None:
    """Load a checkpoint prefix into `model`: ours, or Madry's TF1 format (by name).

    The input normalization is a setting, not a weight, so it is checked against the
    `config.json` beside one of ours: weights trained on other inputs are refused."""
    if not os.path.exists(path + ".index"):
        raise CheckpointError(f"checkpoint '{path}' not found (no {path}.index)")
    if is_madry_tf1(path):
        load_madry_tf1(model, path)
    else:
        check_input_normalization(model, path)
        restore(tf.train.Checkpoint(model=model), path, partial=True)


_NORMALIZATION_KEYS = ("input_normalization", "input_mean", "input_std")


def check_input_normalization(model, path: str) -> None:
    """Raise CheckpointError when the run's `config.json` beside checkpoint `path` names
    another input normalization than `model` has (a config written before the setting
    existed means per_image). Nothing is checked without a readable config.json."""
    import json

    config_path = os.path.join(os.path.dirname(path), "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict) or getattr(model, "input_normalization", None) is None:
        return
    saved = {key: saved.get(key, config_lib.default_value(key)) for key in _NORMALIZATION_KEYS}
    mine = {"input_normalization": model.input_normalization,
            "input_mean": list(model.input_mean), "input_std": list(model.input_std)}
    if saved["input_normalization"] != "channel":  # the constants matter only there
        saved = {k: v for k, v in saved.items() if k == "input_normalization"}
    if {k: mine[k] for k in saved} != saved:
        raise CheckpointError(
            f"checkpoint '{path}' was trained on inputs normalized as {saved} ({config_path}); "
            f"this model normalizes as {mine}: set the same input_normalization (and "
            f"input_mean/input_std) in the config")


def load_madry_tf1(model, path: str) -> None:
    """Assign Madry's TF1 variables (`unit_1_0/sub1/conv1/DW`, ...) to a `MadryWRN`.

    Every variable the model needs must be present with the right shape; the error names
    the first one that is not. Optimizer slots (`.../Momentum`) and `global_step` are ignored.
    """
    if not hasattr(model, "tf1_variables"):
        raise CheckpointError(f"'{path}' is a TF1 checkpoint of Madry's WRN, but the model is "
                              f"{type(model).__name__}; set \"model\": \"madry_wrn\"")
    try:
        reader = tf.train.load_checkpoint(path)
        shapes = reader.get_variable_to_shape_map()
        mapping = model.tf1_variables()
        for name, var in mapping.items():
            if name not in shapes:
                raise CheckpointError(f"TF1 checkpoint '{path}' has no variable '{name}' "
                                      f"(expected shape {list(var.shape)}); is it Madry's "
                                      f"WRN-34?")
            if list(shapes[name]) != list(var.shape):
                width = _tf1_width(shapes)
                hint = (f"the checkpoint is width {width} (set \"model_width\": {width})"
                        if width else "Madry's released models are width 10")
                raise CheckpointError(
                    f"TF1 checkpoint '{path}': variable '{name}' has shape "
                    f"{list(shapes[name])}, the model expects {list(var.shape)} "
                    f"(model width {getattr(model, 'width', '?')}; {hint})")
        for name, var in mapping.items():
            var.assign(reader.get_tensor(name))
    except tf.errors.OpError as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read; it may be truncated or "
                              f"corrupted ({type(e).__name__}: {e.message[:300]})") from None


# The first wide convolution: [3, 3, 16, 16 * width] in Madry's WRN.
WIDTH_VARIABLE = "unit_1_0/sub1/conv1/DW"


def _tf1_width(shapes: dict) -> int | None:
    shape = shapes.get(WIDTH_VARIABLE)
    if shape is None or len(shape) != 4 or shape[3] % 16 or shape[2] != 16:
        return None
    return shape[3] // 16


def madry_tf1_width(path: str) -> int:
    """The WRN width of a TF1 checkpoint of Madry's model, from `unit_1_0/sub1/conv1/DW`
    ([3, 3, 16, 16 * width]: 10 for Madry's released models)."""
    shapes = dict(tf.train.list_variables(path))
    width = _tf1_width(shapes)
    if width is None:
        found = shapes.get(WIDTH_VARIABLE)
        raise CheckpointError(
            f"TF1 checkpoint '{path}': cannot tell the WRN width: variable "
            f"'{WIDTH_VARIABLE}' " + ("is missing" if found is None else
                                      f"has shape {list(found)}")
            + ", expected shape [3, 3, 16, 16 * width] (Madry's WRN-34)")
    return width


def save_weights(model_dir: str, model, config, step: int = 0) -> str:
    """Write `model`'s weights as `model_dir/checkpoint-<step>` with the run's `config.json`
    beside it, as train.py leaves a model_dir, so eval.py, `load_model` and `init_checkpoint`
    read it. For weights made elsewhere (`madry_ns.torch_import`): no optimizer state, so
    fine-tune it through `init_checkpoint` from another model_dir.

    The config is written first (atomically) and the checkpoint's state file last, so an
    interrupted write leaves no checkpoint named as latest. A model_dir that already holds a
    checkpoint is refused rather than overwritten.
    """
    from madry_ns import files

    if latest_checkpoint(model_dir) is not None:
        raise CheckpointError(f"'{model_dir}' already holds a checkpoint "
                              f"({latest_checkpoint(model_dir)}); choose an empty model_dir")
    files.atomic_write_text(os.path.join(model_dir, "config.json"),
                            config.replace(model_dir=model_dir).to_json())
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), model_dir,
                                         max_to_keep=None, checkpoint_name=CHECKPOINT_NAME)
    return manager.save(checkpoint_number=step)


def latest_checkpoint(model_dir: str) -> str | None:
    """`tf.train.latest_checkpoint(model_dir)`, also when the folder was moved.

    The `checkpoint` state file records the path the checkpoint was saved under; when that
    path no longer exists (a zip made on another machine, a renamed folder), the same file
    name inside `model_dir` is used. No state file means no checkpoint, as for Madry.
    """
    path = tf.train.latest_checkpoint(model_dir)
    if path is not None:
        return path
    state = tf.train.get_checkpoint_state(model_dir)
    if state is None or not state.model_checkpoint_path:
        return None
    moved = os.path.join(model_dir, os.path.basename(state.model_checkpoint_path))
    return moved if os.path.exists(moved + ".index") else None


def checkpoint_step(path: str) -> int:
    """The global step of a checkpoint: Madry's `global_step` variable in a TF1 checkpoint,
    else the number in its `.../checkpoint-<step>` name (0 when it has none)."""
    try:
        reader = tf.train.load_checkpoint(path)
        if not reader.has_tensor(OBJECT_GRAPH_KEY) and reader.has_tensor("global_step"):
            return int(reader.get_tensor("global_step"))
    except (tf.errors.OpError, ValueError):
        pass  # unreadable here; load_weights reports it properly
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else 0


def resolve(path: str) -> str:
    """A checkpoint prefix from a model_dir (its latest checkpoint) or a prefix."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in '{path}' (no 'checkpoint' state file "
                                  f"naming one); pass a checkpoint prefix such as "
                                  f"{os.path.join(path, 'checkpoint-70000')}")
        return latest
    if not os.path.exists(path + ".index"):
        raise CheckpointError(f"checkpoint '{path}' not found: neither a folder nor a "
                              f"checkpoint prefix (no {path}.index)")
    return path


KERAS_MODEL = "model.keras"  # train.py's final model in model_dir, with save_keras


def save_keras(model, path: str) -> None:
    """`model.save(path)` (Keras' `.keras` format) atomically: into a temporary sibling, then
    renamed over `path`, so a crash never leaves half a file where a model was."""
    if not str(path).endswith(".keras"):
        raise CheckpointError(f"a Keras model file must end in .keras, not '{path}'")
    with files.atomic_path(path) as tmp:
        model.save(tmp)


def load_model(path: str):
    """A Keras model with the weights of a checkpoint, ready for `model(x)` (logits of 0-255
    images; BN in population mode unless `bn_mode` says otherwise).

    `path` is a model_dir (its latest checkpoint) or a checkpoint prefix, in Madry's TF1
    format (fetch_model.py's `models/adv_trained/checkpoint-70000`) or ours. For TF1 the
    architecture is Madry's WRN-34 with the width read from the checkpoint; for ours it comes
    from the `config.json` train.py writes into model_dir (next to the checkpoint). A
    `.keras` file (`model.save("m.keras")`) is read by Keras, its classes registered by
    `madry_ns.models`.
    """
    if str(path).endswith(".keras"):
        import keras

        if not os.path.isfile(path):
            raise CheckpointError(f"model file '{path}' does not exist")
        return keras.saving.load_model(path)
    prefix = resolve(path)
    if is_madry_tf1(prefix):
        model = models.MadryWRN(width=madry_tf1_width(prefix)).build_for_input()
    else:
        config_path = os.path.join(os.path.dirname(prefix), "config.json")
        if not os.path.exists(config_path):
            raise CheckpointError(
                f"cannot tell the architecture of checkpoint '{prefix}': no config.json next "
                f"to it (train.py writes one into model_dir); copy the run's config.json to "
                f"{config_path}")
        model = models.build_model(config_lib.load(config_path))
    load_weights(model, prefix)
    return model
