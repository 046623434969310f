"""README's "Python API" example runs as printed: fit, .keras round trip, evaluate_model."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_example(), "README.md (Python API)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "digits.keras").is_file()
    table = [line for line in printed.getvalue().splitlines() if line.startswith("|")]
    assert table[0] == "| attack | BN | PN | BN+Shaping 1:9 | seconds |"
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["clean", "FGSM",
                                                                   "adaptive PGD"]
