"""The numbers recorded in docs/evaluation/ reproduce with today's code, image by image.

The madry digits suite (docs/evaluation/madry) was made at an earlier commit by
`bash docs/experiments/shaping_digits.sh`. This test retrains that model (Madry PGD on the
digits, configs/quickstart.json, 200 steps: training is a stateless function of its seeds) or
uses `MADRY_NS_DIGITS_MADRY` (a model_dir with checkpoint-200), then

* resumes the stored suite: `--resume` must accept it (same labels, same columns, same
  settings, and the clean predictions equal image by image) and carry its rows over without
  generating anything;
* runs rows afresh (`FRESH_ROWS`) and compares every image's outcome with the stored
  per_image.npz.

Training takes minutes on two cores and the suite rows more, so it is `extended`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORED = os.path.join(ROOT, "docs", "evaluation", "madry")
BUDGET = dict(cw_steps=50, apgd_steps=10, apgd_targets=1, square_queries=100, eot_samples=3,
              sanity_step_factor=2, sanity_restarts=1)
ROWS = ("fgsm", "fgsm16", "pgd", "mim", "cw", "deepfool", "shaping", "adaptive",
        "adaptive_other", "eot", "autoattack")
# Rows run afresh by default, one of each kind of seed stream: a deterministic PN transfer,
# a PN transfer with random starts, the shaping attack, adaptive PGD through every column;
# MADRY_NS_REPRODUCE_ALL=1 runs all eleven.
FRESH_ROWS = ROWS if os.environ.get("MADRY_NS_REPRODUCE_ALL") else (
    "fgsm", "pgd", "shaping", "adaptive")


@pytest.fixture(scope="module")
def digits_madry(tmp_path_factory):
    """A folder holding models/shaping_digits/madry (the path the stored suite names)."""
    root = tmp_path_factory.mktemp("repro")
    model_dir = root / "models" / "shaping_digits" / "madry"
    given = os.environ.get("MADRY_NS_DIGITS_MADRY")
    if given:
        shutil.copytree(given, model_dir)
    else:
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                        os.path.join(ROOT, "configs", "quickstart.json"), "--set",
                        f"model_dir={model_dir}"], check=True, cwd=root,
                       stdout=subprocess.DEVNULL)
    return root


def _config(root):
    from madry_ns import config as config_lib

    return config_lib.load(os.path.join(ROOT, "configs", "quickstart.json"),
                           ["model_dir=models/shaping_digits/madry", "num_eval_examples=100"])


@pytest.mark.slow
@pytest.mark.extended
def test_the_stored_madry_digits_suite_reproduces(digits_madry, monkeypatch):
    from madry_ns import evaluate

    monkeypatch.chdir(digits_madry)
    config = _config(digits_madry)
    # The stored folder keys its columns 'bn'/'pn' (written before the rename): read it as
    # the suite reads it, under the current column names.
    _, stored, _ = evaluate.read_suite(STORED, "test")

    # --resume accepts the stored suite and carries its rows over, generating nothing.
    output = digits_madry / "resumed"
    shutil.copytree(STORED, output)

    def no_generation(self, key, mode):
        raise AssertionError(f"--resume generated row {key} again")

    with monkeypatch.context() as m:
        m.setattr(evaluate.Suite, "generator", no_generation)
        settings = evaluate.Settings(attacks=FRESH_ROWS, sanity=False, **BUDGET)
        resumed = evaluate.run(config, settings, "models/shaping_digits/madry/checkpoint-200",
                               str(output), resume=True, out=lambda *_: None)
    assert resumed["resumed_rows"] == list(FRESH_ROWS)

    # A fresh run of rows of each kind gives the stored outcome of every image.
    fresh = evaluate.run(config, evaluate.Settings(attacks=FRESH_ROWS, sanity=False, **BUDGET),
                         "models/shaping_digits/madry/checkpoint-200",
                         str(digits_madry / "fresh"), out=lambda *_: None)
    assert "resumed_rows" not in fresh
    with np.load(digits_madry / "fresh" / "per_image.npz", allow_pickle=False) as z:
        for name in z.files:
            np.testing.assert_array_equal(z[name], stored[name], err_msg=name)
    cells = sum(3 if evaluate.ROW[k].modes is None else len(evaluate.ROW[k].modes)
                for k in FRESH_ROWS)
    assert len(z.files) == 1 + 3 + cells  # labels, clean, and every row's cells
