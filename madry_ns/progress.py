"""Progress bars through `tqdm.auto`: a widget in a Jupyter notebook, a bar redrawn in place
on a terminal, nothing when output goes to a file or a pipe.

Where the output is not interactive, callers print Madry's plain per-batch lines instead
(`is_terminal(sys.stdout)` decides), so logs and parsed output keep his format.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr) is shown live: a terminal, or a Jupyter kernel's
    output stream (where tqdm.auto draws a widget). False for files and pipes."""
    stream = stream or sys.stderr
    if type(stream).__module__.startswith("ipykernel."):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """`desc: 40%|####      | k/total [elapsed<left, rate]`, drawn while `stream` (default
    stderr) is live (`is_terminal`); `update(n)` advances it, `close()` ends it.

    Deviation from the in-house bar of earlier versions: tqdm's layout and rate display.
    """

    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream)
        self._bar = tqdm(total=total, desc=desc, file=self.stream, disable=not self.enabled,
                         dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.done += n
        self._bar.update(n)

    def close(self) -> None:
        """End the bar (a newline on a terminal)."""
        self._bar.close()
