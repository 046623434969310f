"""Atomic file writes and safe reads.

Every output (attack.npy, pred.npy, results, metrics, config copies) is written to a
temporary file in the destination folder and renamed over the target, so a crash or a full
disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """Open a temporary sibling of `path`; on success fsync and rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _permissions(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary sibling's name, with `path`'s extension, for a writer that takes a name
    (Keras' `model.save` wants one ending in `.keras`); on success it is fsynced and
    renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _permissions(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _permissions(path: str) -> int:
    """The mode a plain `open(path, "w")` would leave: the existing file's, else 0666 less
    the umask (mkstemp's temporary files are 0600, readable by their owner only)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_append_line(path: str, line: str) -> None:
    """Append one line to `path`, rewriting the file atomically (small metric logs)."""
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    atomic_write_text(path, old + line.rstrip("\n") + "\n")


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """`np.save(path, array)` atomically (the name is used as given, like np.save with a
    name ending in .npy)."""
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """PNG written to a temporary name and renamed: never a half-written figure."""
    plt = pyplot()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
