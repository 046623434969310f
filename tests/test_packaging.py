"""madry_ns as an installable library: version ranges in setup.cfg, the exact tested versions
in constraints.txt (which the README's commands and CI install with), TensorFlow as an
extra, and every command inside the package."""

from __future__ import annotations

import configparser
import os
import re

import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["train", "eval", "pgd_attack", "run_attack", "rna_eval", "fetch_model",
            "evaluate", "fragile", "analysis", "benchmark"]


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg


def _requirements(text):
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def _constraints() -> dict:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                pins[canonicalize_name(name)] = version
    return pins


def test_requirements_are_ranges_and_the_tested_versions_are_pinned_in_constraints():
    cfg = _setup_cfg()
    extras = cfg["options.extras_require"]
    required = _requirements(cfg["options"]["install_requires"])
    assert not any(canonicalize_name(r.name).startswith("tensorflow-cpu") for r in required)
    pins = _constraints()
    for requirement in required + [r for extra in extras for r in _requirements(extras[extra])]:
        specifiers = {s.operator for s in requirement.specifier}
        assert "==" not in specifiers and {">=", "<"} <= specifiers, requirement
        version = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)


def test_tensorflow_is_an_extra_one_per_build():
    extras = _setup_cfg()["options.extras_require"]
    assert [r.name for r in _requirements(extras["cpu"])] == ["tensorflow-cpu"]
    [gpu] = _requirements(extras["gpu"])
    assert gpu.name == "tensorflow" and gpu.extras == {"and-cuda"}
    assert _constraints()["tensorflow"] == _constraints()["tensorflow-cpu"]


def test_the_readme_commands_and_ci_install_with_the_constraints():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.search(r"```\n(.*?)```", f.read(), re.S).group(1)
    first, second = [line for line in block.splitlines() if line.strip()]
    assert "pip install -q -c constraints.txt -e '.[cpu]' " in first
    assert "pip install -q -c constraints.txt -e '.[cpu,test]' " in second
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert second in f.read()


def test_every_command_is_a_module_of_the_installed_packages():
    """What a wheel holds is setup.cfg's `packages = find:` with its include: each command's
    module (or package, with its `__main__.py`) is in it, with a `__main__` guard, and none
    imports a top-level script, so a non-editable install runs them without a checkout."""
    include = _setup_cfg()["options.packages.find"]["include"].split()
    packages = set(setuptools.find_packages(ROOT, include=include))
    assert {"madry_ns", "madry_ns.attacks", "madry_ns.evaluate"} <= packages
    scripts = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    for name in COMMANDS:
        path = os.path.join(ROOT, "madry_ns", name)
        if os.path.isdir(path):
            assert f"madry_ns.{name}" in packages
            path = os.path.join(path, "__main__.py")
        else:
            path += ".py"
        with open(path, encoding="utf-8") as f:
            source = f.read()
        assert path.endswith("__main__.py") or 'if __name__ == "__main__":' in source, name
        imported = set(re.findall(r"^\s*(?:from|import) (\w+)", source, re.M))
        assert not imported & scripts, (name, imported & scripts)
