"""docs/experiments/fashion_mnist.sh keeps what a later session needs in git.

A new machine has no $MODELS, so the script keeps each finished training's final checkpoint
in DOCS/models/NAME and puts it back before any part that needs it. These tests run the script
with a stand-in for Python that records each call and writes what train.py and the suite
would, so they check the script's bookkeeping in about a second, without TensorFlow.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "experiments", "fashion_mnist.sh")
TRAININGS = ["madry_pgd", "shaping_pgd", "shaping_pgd_r1", "shaping_pgd_r7", "trades",
             "shaping_trades"]

# The stand-in: train.py writes checkpoint-900 (unless FAKE_FAIL names the model, which
# stops like a killed training); the suite and eval.py need a finished model in model_dir.
FAKE = r'''
import json, os, sys
args = sys.argv[1:]
sets = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
model_dir = sets.get("model_dir")
has_model = bool(model_dir) and os.path.exists(os.path.join(model_dir, "checkpoint"))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"args": args, "had_checkpoint": has_model}) + "\n")
if args[0] == "train.py":
    name = os.path.basename(model_dir)
    if has_model:
        print("nothing to do")
        sys.exit(0)
    if name == os.environ.get("FAKE_FAIL"):
        with open(os.path.join(model_dir, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "checkpoint-300"\n')
        print("interrupted by SIGTERM at step 300")
        sys.exit(143)
    for suffix in (".index", ".data-00000-of-00001"):
        with open(os.path.join(model_dir, "checkpoint-900" + suffix), "w") as f:
            f.write(name + suffix)
    with open(os.path.join(model_dir, "checkpoint-800.index"), "w") as f:
        f.write("older")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"model_dir": model_dir}, f)
    with open(os.path.join(model_dir, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "checkpoint-900"\n'
                'all_model_checkpoint_paths: "checkpoint-800"\n'
                'all_model_checkpoint_paths: "checkpoint-900"\n')
    print("Step 900: trained " + name)
    sys.exit(0)
if args[:2] == ["-m", "madry_ns.studies.fragile"]:
    if "--rows" in args:  # one row: train (unless kept) and evaluate it
        key = args[args.index("--rows") + 1]
        row_dir = os.path.join("models", "fragile_fashion_mnist", key)
        if key.startswith("bn_"):  # fine-tuned from NORMAL
            assert os.path.exists("models/fragile_fashion_mnist/normal/checkpoint")
        if not os.path.exists(os.path.join(row_dir, "checkpoint")):
            if key == os.environ.get("FAKE_FAIL"):
                sys.exit(143)
            for suffix in (".index", ".data-00000-of-00001"):
                open(os.path.join(row_dir, "checkpoint-360" + suffix), "w").close()
            open(os.path.join(row_dir, "config.json"), "w").close()
            with open(os.path.join(row_dir, "checkpoint"), "w") as f:
                f.write('model_checkpoint_path: "checkpoint-360"\n')
        with open(os.path.join(row_dir, "fragile_eval.json"), "w") as f:
            json.dump({"row": key}, f)
    else:  # the table: every row cached
        rows = os.path.join("models", "fragile_fashion_mnist")
        assert all(os.path.exists(os.path.join(rows, k, "fragile_eval.json"))
                   for k in os.listdir(rows)) and len(os.listdir(rows)) == 12
        out = args[args.index("--output") + 1]
        os.makedirs(os.path.join(out, "bn_analysis"))
        for name in ("table.md", "table.json", "bn_analysis/summary.json",
                     "bn_analysis/bn_layers.csv", "bn_analysis/mean_m_per_layer.png",
                     "bn_analysis/hist_layer_00.png"):
            open(os.path.join(out, name), "w").close()
    sys.exit(0)
assert has_model, "evaluated a model_dir without a checkpoint"
if args[:2] == ["-m", "madry_ns.evaluate"]:
    out = args[args.index("--output") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"resume": "--resume" in args}, f)
    print("suite done")
elif args[0] == "eval.py":
    print("natural: 70.00%")
elif args[0] == "rna_eval.py":
    with open(args[args.index("--output") + 1], "a") as f:
        f.write(json.dumps({"resume": "--resume" in args}) + "\n")
    print("rna_eval done")
'''


@pytest.fixture
def run(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    # In tmp_path, as if it were the repository: the fragile rows' models go where their
    # configs say, models/fragile_fashion_mnist, relative to the working directory.
    env = {**os.environ, "PYTHON": str(python), "FAKE_LOG": str(log)}

    def go(*parts, fail=None, check=True):
        proc = subprocess.run(["bash", SCRIPT, *parts], cwd=tmp_path, capture_output=True,
                              text=True, env={**env, "FAKE_FAIL": fail or ""})
        if check:
            assert proc.returncode == 0, proc.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return go


def test_a_finished_training_is_kept_in_docs_and_put_back_on_a_new_machine(run, tmp_path):
    import shutil

    run("train")
    for name in TRAININGS:
        kept = tmp_path / "docs" / "fashion_mnist" / "models" / name
        # Only the final checkpoint, under a state file that names it alone.
        assert sorted(os.listdir(kept)) == [
            "checkpoint", "checkpoint-900.data-00000-of-00001", "checkpoint-900.index",
            "config.json", "train.log"]
        assert (kept / "checkpoint").read_text() == (
            'model_checkpoint_path: "checkpoint-900"\n'
            'all_model_checkpoint_paths: "checkpoint-900"\n')
        assert (kept / "checkpoint-900.index").read_text() == name + ".index"
        assert f"Step 900: trained {name}" in (kept / "train.log").read_text()
    shutil.rmtree(tmp_path / "models")  # the next session's machine

    _, calls = run("train")
    assert [c["had_checkpoint"] for c in calls] == [True] * len(TRAININGS)
    _, calls = run("table1", "madry_pgd")
    assert [c["args"][:2] for c in calls] == [["-m", "madry_ns.evaluate"], ["eval.py", "--once"]]
    assert all(c["had_checkpoint"] for c in calls)
    out = tmp_path / "docs" / "fashion_mnist" / "table1" / "madry_pgd"
    assert json.loads((out / "suite" / "results.json").read_text()) == {"resume": True}
    assert (out / "clean_10000.txt").read_text() == "natural: 70.00%\n"
    assert "suite done" in (out / "suite_console.txt").read_text()

    # A second run adds nothing but the suite's --resume (which finds it finished).
    _, calls = run("table1", "madry_pgd")
    assert [c["args"][:2] for c in calls] == [["-m", "madry_ns.evaluate"]]


def test_a_stopped_training_is_not_kept_and_its_model_is_not_evaluated(run, tmp_path):
    proc, _ = run("train", fail="shaping_pgd", check=False)
    assert proc.returncode != 0
    kept = tmp_path / "docs" / "fashion_mnist" / "models"
    assert sorted(os.listdir(kept)) == ["madry_pgd"]  # the script stops at the stopped one

    proc, calls = run("table1", "shaping_pgd", check=False)
    assert proc.returncode != 0 and calls == []
    assert "shaping_pgd has not finished training" in proc.stderr
    proc, calls = run("table4", check=False)
    assert proc.returncode != 0 and calls == []
    assert "has not finished training" in proc.stderr


def test_train_names_trains_only_those(run, tmp_path):
    _, calls = run("train", "shaping_pgd_r1", "madry_pgd")
    dirs = [a.split("=", 1)[1] for c in calls for a in c["args"] if a.startswith("model_dir=")]
    assert dirs == ["models/fashion_mnist/" + n for n in ("shaping_pgd_r1", "madry_pgd")]
    kept = tmp_path / "docs" / "fashion_mnist" / "models"
    assert sorted(os.listdir(kept)) == ["madry_pgd", "shaping_pgd_r1"]


FRAGILE_ROWS = ["normal", "normal_bn_only", "normal_bn_only_logits_conv1", "adv", "adv_bn_only",
                "adv_bn_only_logits_conv1", "bn_stats", "bn_stats_reset", "bn_only_params",
                "bn_only_params_batch", "bn_params", "bn_params_logits_conv1"]


def test_the_script_runs_every_fragile_row_the_configs_have_normal_first():
    """The script's row list is configs/fragile/fashion_mnist, and each config's model_dir is
    where the script keeps and puts back that row's model."""
    from madry_ns import config

    folder = os.path.join(ROOT, "configs", "fragile", "fashion_mnist")
    assert sorted(FRAGILE_ROWS) == sorted(f[:-5] for f in os.listdir(folder))
    with open(SCRIPT, encoding="utf-8") as f:
        listed = f.read().split("for key in ", 1)[1].split("; do", 1)[0]
    assert listed.replace("\\", " ").split() == FRAGILE_ROWS
    for key in FRAGILE_ROWS:
        c = config.load(os.path.join(folder, key + ".json"))
        assert c.model_dir == f"models/fragile_fashion_mnist/{key}"
        assert c.init_checkpoint in (None, "models/fragile_fashion_mnist/normal")


def test_each_finished_fragile_row_is_kept_and_a_new_machine_runs_only_the_rest(run, tmp_path):
    import shutil

    proc, calls = run("fragile", fail="bn_stats", check=False)
    assert proc.returncode != 0
    kept = tmp_path / "docs" / "fashion_mnist" / "fragile" / "models"
    done = FRAGILE_ROWS[:FRAGILE_ROWS.index("bn_stats")]
    assert sorted(os.listdir(kept)) == sorted(done)
    assert sorted(os.listdir(kept / "normal")) == [
        "checkpoint", "checkpoint-360.data-00000-of-00001", "checkpoint-360.index",
        "config.json", "fragile_eval.json", "train.log"]
    shutil.rmtree(tmp_path / "models")

    _, calls = run("fragile")
    rows = [c["args"][c["args"].index("--rows") + 1] for c in calls if "--rows" in c["args"]]
    assert rows == FRAGILE_ROWS[len(done):]
    assert sorted(os.listdir(kept)) == sorted(FRAGILE_ROWS)
    table = tmp_path / "docs" / "fashion_mnist" / "fragile"
    assert sorted(os.listdir(table / "bn_analysis")) == [
        "bn_layers.csv", "mean_m_per_layer.png", "summary.json"]
    assert (table / "table.md").exists() and (table / "table.json").exists()


def test_rna_trains_both_networks_keeps_them_and_evaluates_each_with_resume(run, tmp_path):
    import shutil

    _, calls = run("rna")
    assert [(c["args"][0], c["had_checkpoint"]) for c in calls] == [
        ("train.py", False), ("rna_eval.py", True)] * 2
    for norm in ("rna", "bn"):
        assert (tmp_path / "docs" / "fashion_mnist" / "models" / f"rna_{norm}" /
                "checkpoint").exists()
        out = tmp_path / "docs" / "fashion_mnist" / "rna" / norm
        assert json.loads((out / "rna_eval.jsonl").read_text()) == {"resume": True}
        assert "rna_eval done" in (out / "console.txt").read_text()
    trained = [a for c in calls for a in c["args"] if a.startswith("norm_layer=")]
    assert trained == ["norm_layer=rna"] * 2 + ["norm_layer=bn"] * 2
    shutil.rmtree(tmp_path / "models")  # a new machine: the kept models are put back
    _, calls = run("rna")
    assert [(c["args"][0], c["had_checkpoint"]) for c in calls] == [
        ("train.py", True), ("rna_eval.py", True)] * 2
