"""The quickstart end to end, as the README runs it, on a reduced step count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.json")


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.extended
def test_quickstart_trains_then_prints_clean_and_pgd_accuracy(tmp_path):
    model_dir = str(tmp_path / "quickstart")
    overrides = ["--set", "max_num_training_steps=20", "--set", f"model_dir={model_dir}",
                 "--set", "num_eval_examples=100"]
    train_out = _run([os.path.join(ROOT, "train.py"), "--config", QUICKSTART] + overrides,
                     tmp_path)
    steps = [int(m.group(1)) for m in re.finditer(r"^Step (\d+):    \(", train_out, re.M)]
    assert steps == [0]  # num_output_steps 50: one report in 20 steps
    assert re.search(r"^    training adv accuracy \d+(\.\d+)?%$", train_out, re.M)
    assert os.path.exists(os.path.join(model_dir, "checkpoint-20.index"))

    eval_out = _run([os.path.join(ROOT, "eval.py"), "--config", QUICKSTART, "--once"]
                    + overrides, tmp_path)
    lines = eval_out.strip().splitlines()
    assert lines[0].startswith(f"Checkpoint {os.path.join(model_dir, 'checkpoint-20')}, "
                               f"evaluating ...")
    natural = re.search(r"^natural: (\d+\.\d\d)%$", eval_out, re.M)
    adversarial = re.search(r"^adversarial: (\d+\.\d\d)%$", eval_out, re.M)
    assert natural and adversarial
    # 20 steps leave the model near chance, where PGD may even help: only the format and
    # the range are checked here (the README records the full quickstart's numbers)
    assert all(0.0 <= float(m.group(1)) <= 100.0 for m in (natural, adversarial))
    assert re.search(r"^avg nat loss: \d+\.\d{4}$", eval_out, re.M)
    assert re.search(r"^avg adv loss: \d+\.\d{4}$", eval_out, re.M)
    with open(os.path.join(model_dir, "eval", "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["step"] == 20 and record["num_examples"] == 100
    assert f"{record['natural_accuracy'] * 100:.2f}" == natural.group(1)


@pytest.mark.slow
def test_madry_verbatim_config_trains_on_madry_pickles(tmp_path, madry_pickles):
    # "Done when": Madry's own config.json, read from the working directory as his scripts
    # do, with only the step count and the width lowered and data_path at Madry-format files.
    data_path = madry_pickles(tmp_path, n_train_per_batch=26, n_test=10)["data_path"]
    with open(os.path.join(ROOT, "tests", "data", "madry_config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    out = _run([os.path.join(ROOT, "train.py"), "--set", "max_num_training_steps=2",
                "--set", "model_width=1", "--set", f"data_path={data_path}"], tmp_path)
    lines = out.strip().splitlines()
    assert re.fullmatch(r"Step 0:    \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\)", lines[0])
    assert re.fullmatch(r"    training nat accuracy \d+(\.\d+)?%", lines[1])
    assert re.fullmatch(r"    training adv accuracy \d+(\.\d+)?%", lines[2])
    model_dir = tmp_path / "models" / "a_very_robust_model"
    files = set(os.listdir(model_dir))
    assert {"checkpoint", "config.json", "checkpoint-0.index", "checkpoint-2.index"} <= files
    assert any(f.startswith("events.out.tfevents.") for f in files)
    with open(model_dir / "config.json") as f:
        copied = json.load(f)
    assert copied["training_batch_size"] == 128 and copied["num_steps"] == 10
    assert copied["max_num_training_steps"] == 2 and copied["model_width"] == 1
