"""Config: Madry's config.json loads as is; every invalid input is a clear ConfigError; the
scripts report user errors as one `error:` paragraph, exit status 2, no traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from madry_ns import config as config_lib
from madry_ns.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADRY_CONFIG = os.path.join(ROOT, "tests", "data", "madry_config.json")

# cifar10_challenge config.json at f15682d (madry_reference.md section 2), typed by hand.
MADRY_VALUES = {
    "model_dir": "models/a_very_robust_model", "data_path": "cifar10_data",
    "tf_random_seed": 451760341, "np_random_seed": 216105420,
    "max_num_training_steps": 80000, "num_output_steps": 100, "num_summary_steps": 100,
    "num_checkpoint_steps": 1000, "training_batch_size": 128,
    "step_size_schedule": [[0, 0.1], [40000, 0.01], [60000, 0.001]],
    "weight_decay": 0.0002, "momentum": 0.9, "num_eval_examples": 10000,
    "eval_batch_size": 100, "eval_on_cpu": False, "epsilon": 8.0, "num_steps": 10,
    "step_size": 2.0, "random_start": True, "loss_func": "xent",
    "store_adv_path": "attack.npy",
}
# The foundation's own keys and the values that keep Madry's behaviour.
MADRY_BEHAVIOUR_DEFAULTS = {
    "model": "madry_wrn", "model_width": None, "dataset": "cifar10", "augmentation": "madry",
    "training_method": "madry", "train_attack_bn_mode": "batch_update",
    "input_normalization": "per_image",
}


def write_config(tmp_path, values=None, text=None, name="config.json"):
    path = tmp_path / name
    path.write_text(text if text is not None else json.dumps(values))
    return str(path)


def load_error(tmp_path, values=None, text=None, overrides=()) -> str:
    path = write_config(tmp_path, values, text)
    with pytest.raises(ConfigError) as info:
        config_lib.load(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------
# Madry's file and the root config.json


def test_madry_verbatim_config_loads_with_madry_values():
    with open(MADRY_CONFIG) as f:
        text = f.read()
    # The fixture really is Madry's file: five repeated _comment keys.
    assert text.count('"_comment"') == 5
    config = config_lib.load(MADRY_CONFIG)
    for key, value in MADRY_VALUES.items():
        assert getattr(config, key) == value, key
        assert type(getattr(config, key)) is type(value), key


def test_madry_keys_come_first_in_madry_order():
    names = [f.name for f in config_lib.fields()]
    assert names[:len(MADRY_VALUES)] == list(MADRY_VALUES)
    assert all(f.metadata["madry"] == (f.name in MADRY_VALUES) for f in config_lib.fields())


def test_root_config_is_madry_values_plus_madry_ns_defaults():
    path = os.path.join(ROOT, "config.json")
    pairs = json.load(open(path), object_pairs_hook=lambda p: p)
    keys = [k for k, _ in pairs if not k.startswith("_")]
    # Every key is written out, once, in field order.
    assert keys == [f.name for f in config_lib.fields()]
    config = config_lib.load(path)
    for key, value in MADRY_VALUES.items():
        assert getattr(config, key) == value, key
    for f in config_lib.fields():
        if f.name not in MADRY_VALUES:
            assert getattr(config, f.name) == config_lib.default_value(f.name), f.name


def test_defaults_keep_madry_behaviour():
    config = config_lib.from_dict({})
    for key, value in {**MADRY_VALUES, **MADRY_BEHAVIOUR_DEFAULTS}.items():
        assert getattr(config, key) == value, key


def test_config_is_frozen_and_replace_validates():
    config = config_lib.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epsilon = 4.0
    assert config.replace(epsilon=4).epsilon == 4.0
    assert isinstance(config.replace(epsilon=4).epsilon, float)
    with pytest.raises(ConfigError, match="epsilon"):
        config.replace(epsilon=-1.0)


def test_to_json_round_trips(tmp_path):
    config = config_lib.from_dict({"epsilon": 4.0, "model_width": 2, "loss_func": "cw"})
    path = write_config(tmp_path, text=config.to_json())
    assert config_lib.load(path) == config


# ----------------------------------------------------------------------------------------
# Errors


def test_unknown_key_names_it_and_the_closest_known_key(tmp_path):
    message = load_error(tmp_path, {"epsilonn": 8.0})
    assert "unknown key 'epsilonn'" in message
    assert "did you mean 'epsilon'" in message
    assert str(tmp_path / "config.json") in message


@pytest.mark.parametrize("typo, closest", [("num_step", "num_steps"),
                                           ("step_size_schedul", "step_size_schedule"),
                                           ("random_strat", "random_start"),
                                           ("training_batchsize", "training_batch_size")])
def test_unknown_key_suggestions(tmp_path, typo, closest):
    assert f"did you mean '{closest}'" in load_error(tmp_path, {typo: 1})


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    message = load_error(tmp_path, {"zzzzqqq": 1})
    assert "unknown key 'zzzzqqq'" in message and "did you mean" not in message


@pytest.mark.parametrize("key, value, expected", [
    ("epsilon", "8", "a number"),
    ("epsilon", None, "a number"),
    ("num_steps", True, "an integer"),          # bool is not an int
    ("training_batch_size", False, "an integer"),
    ("num_steps", 10.0, "an integer"),
    ("num_steps", "10", "an integer"),
    ("random_start", 1, "true or false"),       # int is not a bool
    ("eval_on_cpu", 0, "true or false"),
    ("random_start", "true", "true or false"),
    ("loss_func", 1, "a string"),
    ("model_dir", ["a"], "a string"),
    ("step_size_schedule", 0.1, "a list"),
    ("model_width", 1.5, "an integer or null"),
])
def test_wrong_type_names_key_value_and_expectation(tmp_path, key, value, expected):
    message = load_error(tmp_path, {key: value})
    assert f"key '{key}' has value {json.dumps(value)}, expected {expected}" in message
    assert str(tmp_path / "config.json") in message


@pytest.mark.parametrize("key, value, expected", [
    ("epsilon", 0.0, "a value > 0"),
    ("epsilon", -8.0, "a value > 0"),
    ("step_size", 0, "a value > 0"),
    ("step_size", -2.0, "a value > 0"),
    ("num_steps", 0, "a value > 0"),
    ("training_batch_size", 0, "a value > 0"),
    ("eval_batch_size", -1, "a value > 0"),
    ("num_eval_examples", 0, "a value > 0"),
    ("max_num_training_steps", 0, "a value > 0"),
    ("num_checkpoint_steps", 0, "a value > 0"),
    ("model_width", 0, "a value > 0"),
    ("momentum", 1, "a value in [0, 1)"),
    ("momentum", 1.5, "a value in [0, 1)"),
    ("momentum", -0.1, "a value in [0, 1)"),
    ("weight_decay", -0.0002, "a value >= 0"),
    ("loss_func", "l2", "one of 'xent', 'cw'"),
    ("model", "wrn", "one of"),
    ("dataset", "svhn", "one of"),
    ("training_method", "pgd", "one of"),
    ("train_attack_bn_mode", "train", "one of"),
    ("augmentation", "flip", "one of"),
    ("input_normalization", "standard", "one of 'per_image', 'channel', 'none'"),
    ("input_mean", [], "a non-empty list of numbers, one per image channel"),
    ("input_mean", ["0.5"], "a non-empty list of numbers, one per image channel"),
    ("input_std", [0.2, 0.0, 0.2], "a non-empty list of numbers > 0"),
])
def test_out_of_range_names_key_value_and_expectation(tmp_path, key, value, expected):
    message = load_error(tmp_path, {key: value})
    assert f"key '{key}' has value {json.dumps(value)}, expected {expected}" in message


@pytest.mark.parametrize("key, text", [("epsilon", "NaN"), ("epsilon", "Infinity"),
                                       ("weight_decay", "-Infinity")])
def test_non_finite_numbers_are_rejected(tmp_path, key, text):
    message = load_error(tmp_path, text='{"%s": %s}' % (key, text))
    assert f"key '{key}'" in message and "expected a number" in message


@pytest.mark.parametrize("schedule", [
    [[1, 0.1], [40000, 0.01]],             # does not start at 0
    [[0, 0.1], [5, 0.01], [5, 0.001]],     # not strictly increasing
    [[0, 0.1], [5, 0.01], [3, 0.001]],     # decreasing
    [],                                    # empty
    [[0]],                                 # pair too short
    [[0, 0.1, 2]],                         # pair too long
    [0, 0.1],                              # not a list of pairs
    [[0, "0.1"]],                          # learning rate not a number
    [[0, 0.0]],                            # learning rate not > 0
    [[0, -0.1]],
    [[0.0, 0.1]],                          # step not an integer
    [[False, 0.1]],                        # bool is not a step
])
def test_malformed_schedule_is_rejected(tmp_path, schedule):
    message = load_error(tmp_path, {"step_size_schedule": schedule})
    assert f"key 'step_size_schedule' has value {json.dumps(schedule)}" in message
    assert "start at 0" in message and "strictly increase" in message


def test_valid_schedules_are_accepted():
    assert config_lib.from_dict({"step_size_schedule": [[0, 1]]}).step_size_schedule == [[0, 1]]
    schedule = [[0, 0.1], [1, 0.05], [100, 0.01]]
    assert config_lib.from_dict({"step_size_schedule": schedule}).step_size_schedule == schedule


def test_all_problems_are_reported_together(tmp_path):
    message = load_error(tmp_path, {"epsilon": -1, "num_stepz": 3, "random_start": "yes"})
    assert "'epsilon'" in message and "'num_stepz'" in message and "'random_start'" in message
    assert len(message.splitlines()) == 4  # header + one line per problem


def test_invalid_json_names_line_and_column(tmp_path):
    text = '{\n  "epsilon": 8.0,\n  "num_steps": ,\n  "step_size": 2.0\n}\n'
    message = load_error(tmp_path, text=text)
    # The stray comma is on line 3; "  \"num_steps\": " is 15 characters, so column 16.
    assert "line 3, column 16" in message
    assert str(tmp_path / "config.json") in message and "invalid JSON" in message


def test_duplicate_non_comment_key_is_rejected(tmp_path):
    message = load_error(tmp_path, text='{"_comment": "a", "epsilon": 8.0, "_comment": "b", '
                                        '"epsilon": 4.0}')
    assert "'epsilon' appears twice" in message
    assert str(tmp_path / "config.json") in message


def test_duplicate_comment_keys_are_accepted(tmp_path):
    path = write_config(tmp_path, text='{"_comment": "a", "_comment": "b", "_note": 1, '
                                       '"epsilon": 4.0}')
    assert config_lib.load(path).epsilon == 4.0


@pytest.mark.parametrize("text, found", [("[1, 2]", "list"), ('"x"', "str"), ("3", "int"),
                                         ("null", "NoneType")])
def test_non_object_json_is_rejected(tmp_path, text, found):
    message = load_error(tmp_path, text=text)
    assert "expected a JSON object" in message and found in message


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as info:
        config_lib.load(path)
    assert path in str(info.value) and "not found" in str(info.value)


def test_undecodable_file_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"epsilon": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="cannot be read"):
        config_lib.load(str(path))


# ----------------------------------------------------------------------------------------
# --set overrides


def test_set_overrides_parse_json_values_and_plain_strings(tmp_path):
    path = write_config(tmp_path, {"epsilon": 8.0, "loss_func": "xent"})
    config = config_lib.load(path, ["epsilon=4", "num_steps=7", "random_start=false",
                                    "loss_func=cw", "model_dir=runs/a=b",
                                    "step_size_schedule=[[0, 0.2], [10, 0.02]]",
                                    "model_width=null", 'data_path="quoted dir"'])
    assert config.epsilon == 4.0 and isinstance(config.epsilon, float)
    assert config.num_steps == 7 and config.random_start is False
    assert config.loss_func == "cw"                      # not JSON: a plain string
    assert config.model_dir == "runs/a=b"                 # split at the first '=' only
    assert config.step_size_schedule == [[0, 0.2], [10, 0.02]]
    assert config.model_width is None
    assert config.data_path == "quoted dir"


def test_set_override_wins_over_file_value(tmp_path):
    path = write_config(tmp_path, {"epsilon": 8.0})
    assert config_lib.load(path, ["epsilon=2.0"]).epsilon == 2.0
    assert config_lib.load(path, ["epsilon=2.0", "epsilon=3.0"]).epsilon == 3.0


def test_set_override_is_validated_and_named(tmp_path):
    path = write_config(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        config_lib.load(path, ["epsilonn=4"])
    message = str(info.value)
    assert "unknown key 'epsilonn'" in message and "did you mean 'epsilon'" in message
    assert "--set epsilonn=4" in message
    with pytest.raises(ConfigError, match=r"key 'num_steps' has value 0, expected a value > 0"):
        config_lib.load(path, ["num_steps=0"])


def test_set_without_equals_sign_is_an_error(tmp_path):
    path = write_config(tmp_path, {})
    with pytest.raises(ConfigError, match="key=value"):
        config_lib.load(path, ["epsilon"])


# ----------------------------------------------------------------------------------------
# The scripts: user errors are one paragraph, exit status 2, no traceback, no TensorFlow.

# Runs a script as `python <script> ...` would, and reports on exit whether TensorFlow was
# imported (it must not be, for a config error: that is what makes the error instant).
_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write(
    "\\nTF_IMPORTED=%s\\n" % ("tensorflow" in sys.modules)))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(args, cwd, probe=False, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable] + (["-c", _PROBE] if probe else []) + args
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_script_with_bad_config_exits_2_quickly_without_traceback(tmp_path, script):
    bad = write_config(tmp_path, {"epsilon": -8.0, "num_stepz": 3}, name="bad.json")
    result, seconds = run_script([os.path.join(ROOT, script), "--config", bad], tmp_path,
                                 probe=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert bad in result.stderr and "'epsilon'" in result.stderr
    assert "did you mean 'num_steps'" in result.stderr
    assert "TF_IMPORTED=False" in result.stderr
    assert seconds < 20


def test_script_reads_config_json_from_the_working_directory(tmp_path):
    # No ./config.json in the working directory: the default path is named in the error.
    result, _ = run_script([os.path.join(ROOT, "train.py")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: config file 'config.json' not found")
    assert str(tmp_path) in result.stderr and "Traceback" not in result.stderr
    # With one there, a bad value in it is reported against that file.
    write_config(tmp_path, {"num_steps": 0})
    result, _ = run_script([os.path.join(ROOT, "train.py")], tmp_path)
    assert result.returncode == 2 and "config.json" in result.stderr
    assert "key 'num_steps' has value 0" in result.stderr


def test_script_bad_set_override_exits_2(tmp_path):
    path = write_config(tmp_path, {})
    result, _ = run_script([os.path.join(ROOT, "train.py"), "--config", path,
                            "--set", "loss_func=l1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "key 'loss_func' has value \"l1\"" in result.stderr and "--set" in result.stderr


def test_script_without_cifar10_fails_in_seconds_with_instructions(tmp_path, monkeypatch):
    # data_path absent and no prepared tensorflow_datasets copy (offline): a user error that
    # says how to get the data, raised after TensorFlow is up, quickly (no download retries).
    empty = tmp_path / "tfds"
    empty.mkdir()
    path = write_config(tmp_path, {"data_path": str(tmp_path / "absent"),
                                   "model_dir": str(tmp_path / "m")})
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    result, seconds = run_script([os.path.join(ROOT, "train.py"), "--config", path], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: CIFAR-10 not found" in result.stderr and str(empty) in result.stderr
    assert "download_and_prepare" in result.stderr and '"dataset": "digits"' in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 60


def test_channel_constants_belong_to_channel_normalization(tmp_path):
    message = load_error(tmp_path, {"input_mean": [0.5, 0.5, 0.5]})
    assert "input_mean [0.5, 0.5, 0.5] is used only with input_normalization 'channel'" \
        in message
    message = load_error(tmp_path, {"input_normalization": "channel", "input_mean": [0.5],
                                    "input_std": [0.2, 0.2]})
    assert "need the same length" in message
    config = config_lib.from_dict({"input_normalization": "channel", "input_mean": [0.5],
                                   "input_std": [0.25]})
    assert (config.input_mean, config.input_std) == ([0.5], [0.25])

