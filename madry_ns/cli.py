"""Shared command-line plumbing for the top-level scripts (absl flags).

Every script reads `./config.json` by default, like Madry's, and takes `--config PATH` and
repeated `--set key=value` overrides. Input problems (`UserError`) end the script with one
readable paragraph on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Callable

from absl import flags

from madry_ns import config as config_lib
from madry_ns.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "config.json", "Path of the JSON config (Madry's keys plus "
                    "madry_ns keys).")
flags.DEFINE_multi_string("set", [], "Override a config key: --set key=value (value parsed "
                          "as JSON, else taken as a string). Repeatable.")


def load_config() -> config_lib.Config:
    """The config named by --config, with --set overrides applied; then TensorFlow is
    imported (after validation, so a bad config fails in milliseconds)."""
    config = config_lib.load(FLAGS.config, FLAGS.set)
    import_tensorflow_quietly()
    return config


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features) kept off the
    console, so Madry's lines stay readable; the banner is shown if the import fails."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tf.get_logger().setLevel("ERROR")
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def run(main: Callable[[list], int | None]) -> None:
    """`absl.app.run(main)`, with user errors printed as `error: ...` and exit status 2."""
    from absl import app

    app.run(lambda argv: report_user_errors(main, argv))


def report_user_errors(main: Callable[[list], int | None], argv: list):
    """`main(argv)`, ending the process with `error: ...` on stderr and the error's exit
    status (2) on a `UserError`, without a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
