"""The studies are modules of one shape, registered in one place (`madry_ns.studies`)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest

from madry_ns import studies
from madry_ns.errors import ConfigError


@pytest.mark.parametrize("name", sorted(studies.STUDIES))
def test_every_study_has_the_same_shape(name, capsys):
    module = studies.get(name)
    for attribute in studies.SHAPE:
        assert hasattr(module, attribute), f"studies.{name} has no {attribute}"
    assert dataclasses.is_dataclass(module.Settings)
    assert module.Settings.__dataclass_params__.frozen
    module.Settings()  # the defaults are valid
    assert isinstance(module.PAPER, str) and module.PAPER
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    assert "usage: python -m madry_ns.studies." + name in capsys.readouterr().out


def test_an_unknown_study_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown study 'tables'.*shaping, fragile, rna"):
        studies.get("tables")


@pytest.mark.parametrize("old, new", [("madry_ns.fragile", "madry_ns.studies.fragile"),
                                      ("madry_ns.rna_eval", "madry_ns.studies.rna"),
                                      ("madry_ns.evaluate.ablation",
                                       "madry_ns.studies.shaping")])
def test_the_earlier_module_names_are_the_study_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_shaping_settings_check_the_ratios():
    from madry_ns import config as config_lib
    from madry_ns.studies import shaping

    with pytest.raises(ConfigError, match="--ratios -1"):
        shaping.Settings((0, -1))
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "config.json"))
    with pytest.raises(ConfigError, match="eval_batch_size 200 must split into chunks of 1 \\+ 6"):
        shaping.Settings((0, 6)).check(config.replace(eval_batch_size=200))


def test_shaping_keeps_the_checkpoints_a_previous_run_measured():
    """Resuming: a grid entry is reused only for the same checkpoint, settings and ratios."""
    from madry_ns.studies import shaping

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation", "ablation",
                           "ablation.json"), encoding="utf-8") as f:
        stored = json.load(f)
    fresh = {k: v for k, v in stored.items() if k != "grid"}
    fresh["grid"] = {kind: {} for kind in stored["grid"]}
    labels = set(stored["checkpoints"])
    assert shaping._reusable(stored, fresh) == labels
    assert shaping._reusable(None, fresh) == set()
    assert shaping._reusable({**stored, "num_steps": stored["num_steps"] + 1}, fresh) == set()
    moved = dict(stored["checkpoints"])
    first = sorted(moved)[0]
    moved[first] = moved[first] + "-elsewhere"
    assert shaping._reusable(stored, {**fresh, "checkpoints": moved}) == labels - {first}
    more = {**fresh, "ratios": fresh["ratios"] + [99]}
    assert shaping._reusable({**stored, "ratios": more["ratios"]}, more) == set()


def test_shaping_attack_examples_must_be_whole_batches_within_the_clean_images():
    from madry_ns import config as config_lib
    from madry_ns.studies import shaping

    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "config.json"))
    with pytest.raises(ConfigError, match="--attack_examples 0"):
        shaping.Settings((0,), attack_examples=0)
    with pytest.raises(ConfigError, match="--attack_examples 150: expected a multiple of "
                                          "eval_batch_size 100"):
        shaping.Settings((0,), attack_examples=150).check(config)
    with pytest.raises(ConfigError, match="at most num_eval_examples 1000"):
        shaping.Settings((0,), attack_examples=2000).check(
            config.replace(num_eval_examples=1000))
    assert shaping.Settings((0,), 100).attacked(config) == 100
    assert shaping.Settings((0,)).attacked(config) == config.num_eval_examples


def test_shaping_cells_resume_one_by_one_and_grids_before_attack_examples_still_match():
    """A grid stopped inside a checkpoint keeps the ratios it finished; an ablation.json
    written before `attack_examples` existed (all images attacked) matches a run that
    attacks all of them, and not one that attacks fewer."""
    from madry_ns.studies import shaping

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation", "ablation",
                           "ablation.json"), encoding="utf-8") as f:
        stored = json.load(f)
    fresh = {k: v for k, v in stored.items() if k != "grid"}
    fresh["grid"] = {kind: {} for kind in stored["grid"]}
    first = sorted(stored["checkpoints"])[0]
    partial = json.loads(json.dumps(stored))
    for kind in partial["grid"]:
        del partial["grid"][kind][first]["49"]
    del partial["grid"]["adaptive"][first]["19"]  # a cell counts only with all three values
    done = shaping._done_cells(partial, fresh)
    assert done[first] == set(stored["ratios"]) - {19, 49}
    assert shaping._reusable(partial, fresh) == set(stored["checkpoints"]) - {first}
    assert shaping._done_cells(stored, {**fresh, "attack_examples": 10}) == {}


@pytest.mark.slow
@pytest.mark.extended
def test_shaping_grid_attacks_the_first_images_and_resumes_a_stopped_checkpoint(
        tmp_path, monkeypatch):
    """Clean accuracy on all 16 images, the attacks on the first 8; stopped after its first
    cell, the rerun keeps that cell and runs only the other. Extended (not run by default,
    about 35 s): `test_shaping_cells_resume_one_by_one...` checks the resume rule in CI."""
    from conftest import make_tiny_config
    from madry_ns import training
    from madry_ns.studies import shaping

    cfg = make_tiny_config(tmp_path, max_num_training_steps=2, num_eval_examples=16)
    training.train(cfg, out=lambda *_: None)
    out = tmp_path / "grid"

    class Stop(Exception):
        pass

    def stop(result):
        raise Stop

    monkeypatch.setattr(shaping, "ablation", _stopping(shaping.ablation, stop))
    with pytest.raises(Stop):
        shaping.run(cfg, [cfg.model_dir], ["m"], str(out), shaping.Settings((0, 1), 8),
                    out=lambda *_: None)
    saved = json.loads((out / "ablation.json").read_text())
    assert list(saved["grid"]["adaptive"]["m"]) == ["0"] and saved["attack_examples"] == 8
    monkeypatch.undo()
    attacked = []
    real = shaping.pgd_accuracy
    monkeypatch.setattr(shaping, "pgd_accuracy",
                        lambda suite, b, mode: attacked.append(len(b)) or real(suite, b, mode))
    lines = []
    result = shaping.run(cfg, [cfg.model_dir], ["m"], str(out), shaping.Settings((0, 1), 8),
                         command="grid", out=lines.append)
    assert attacked == [1]  # one batch of 8, for the ratio 1:1 only
    assert "m: 1:0 kept from the previous run" in lines[0]
    assert result["grid"]["clean"]["m"]["0"] == saved["grid"]["clean"]["m"]["0"]
    for kind, n in (("clean", 16), ("transfer", 8), ("adaptive", 8)):
        for value in result["grid"][kind]["m"].values():
            assert (value * n) == int(value * n)
    assert "(the attacks on the first 8)" in (out / "ablation.md").read_text()


def _stopping(ablation, stop):
    """`ablation` whose progress callback saves, then calls `stop` (a kill after a cell)."""
    def run(*args, on_checkpoint=None, **kwargs):
        def save_then_stop(result):
            on_checkpoint(result)
            stop(result)
        return ablation(*args, on_checkpoint=save_then_stop, **kwargs)
    return run
