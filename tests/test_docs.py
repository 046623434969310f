"""The README and configs stay true to the code."""

import glob
import os
import re

import pytest

from madry_ns import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_opens_with_exactly_the_two_setup_commands_and_ci_runs_the_second():
    block = re.search(r"```\n(.*?)```", _readme(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "train.py --config configs/quickstart.json" in commands[0]
    assert "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert commands[1] in f.read()


def test_readme_configuration_table_matches_the_config_fields():
    assert config.readme_table() in _readme()


def test_root_config_is_madry_plus_every_default():
    loaded = config.load(os.path.join(ROOT, "config.json"))
    assert loaded == config.from_dict({})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"),
                                                  recursive=True)))
def test_every_shipped_config_loads(path):
    config.load(path)


def test_local_links_in_the_readme_and_docs_point_to_files():
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to {target}"
