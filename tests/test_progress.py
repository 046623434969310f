"""Progress bars (`madry_ns.progress`, tqdm.auto): drawn on a terminal and in a notebook,
nothing written where output is a file, so Madry's plain lines stay the only output there."""

from __future__ import annotations

import io

from madry_ns import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_nothing_is_written_where_output_is_a_file_or_pipe():
    stream = io.StringIO()
    bar = progress.Progress(4, "attacking", stream=stream)
    assert not bar.enabled and not progress.is_terminal(stream)
    for _ in range(4):
        bar.update()
    bar.close()
    assert stream.getvalue() == "" and bar.done == 4


def test_a_terminal_gets_a_bar_with_its_description_and_count():
    stream = _Terminal()
    bar = progress.Progress(5, "evaluating", stream=stream)
    assert bar.enabled
    bar.update(3)
    bar.close()
    text = stream.getvalue()
    assert "evaluating" in text and "3/5" in text and text.endswith("\n")


def test_a_notebook_output_stream_counts_as_live():
    """A Jupyter kernel's stdout/stderr (ipykernel.iostream.OutStream) is no TTY, yet shown
    live: tqdm.auto draws its widget there, and callers skip Madry's per-batch lines."""
    notebook_stream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})()
    assert not notebook_stream.isatty() and progress.is_terminal(notebook_stream)


def test_the_bar_is_tqdm_auto():
    from tqdm.auto import tqdm

    assert isinstance(progress.Progress(1, "x", stream=io.StringIO())._bar, tqdm)
