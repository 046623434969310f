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
