"""README "Layout" lists every module of the package and every top-level script, one line
each, and nothing that is not in the tree."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files every package has; the package itself is listed through its modules.
_IMPLIED = ("__init__.py", "__main__.py")


def _layout_rows() -> list:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def _tree() -> set:
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "madry_ns")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py") and name not in _IMPLIED:
                found.add(os.path.relpath(os.path.join(folder, name), ROOT))
    found.update(name for name in os.listdir(ROOT) if name.endswith(".py"))
    return found


def test_the_readme_layout_matches_the_tree():
    listed = []
    for row in _layout_rows():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 2 and cells[1], f"a Layout row needs a path and a line: {row}"
        listed += re.findall(r"`([^`]+\.py)`", cells[0])
    assert len(listed) == len(set(listed)), "a module is listed twice"
    tree = _tree()
    assert sorted(set(listed) - tree) == [], "listed but not in the tree"
    assert sorted(tree - set(listed)) == [], "in the tree but not in README Layout"
