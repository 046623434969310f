"""The one command-line convention of every command (argparse), in one place.

A command builds a `Parser` (its prog, its docstring, its `main`) and hands it to `run`:

    def train(config, args):
        ...

    def main(argv=None) -> int:
        return cli.run(cli.Parser("python train.py", __doc__, train), argv)

* `--help` shows the docstring's first paragraph and every flag.
* A command that reads a config (the default) takes `--config PATH` (default `config.json`
  in the working directory, as Madry's scripts read) and repeated `--set key=value`
  overrides; `run` loads and validates the config (`config.load`) and only then imports
  TensorFlow (`import_tensorflow_quietly`), so a bad config fails in milliseconds.
* Flags are spelled with underscores, as the config keys are (`--num_examples`,
  `--aa_steps`, `--from_zip`). The dashed spelling of any flag (`--aa-steps`, as earlier
  versions spelled some) is still read, with one line `note: --aa-steps is now --aa_steps`
  on stderr per flag.
* A `UserError` ends the process with `error: ...` on stderr and exit status 2 (or the
  error's own status), without a traceback; a `UsageError` is reported as argparse reports
  a bad command line (usage line, then the message; status 2).
* Subcommands are argparse's: `parser.add_subparsers()`, then
  `add_parser(name, doc=..., main=..., config=...)` makes each a `Parser` of its own; `run`
  runs the one chosen.

Deviations from the absl flags that earlier versions of the drop-in scripts used (Madry's
own scripts take no flags): a switch is `--once` only (no `--noonce`, no `--once=false`);
long flags take two dashes; no `--flagfile`, `--helpfull` or absl's logging flags; extra
arguments, which absl handed unread to `main`, are errors. Abbreviated flags are not
expanded, in the modules that used argparse before either.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from typing import Callable, Sequence

from madry_ns import config as config_lib
from madry_ns.errors import UsageError, UserError


def comma_list(text: str) -> tuple:
    """argparse `type` for a comma-separated list (`--protocols paper,eot`), as absl's
    DEFINE_list read it: blanks around the commas dropped; unlike absl, empty items too."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that knows its command.

    `main` is called by `run` as `main(config, args)` when the parser reads a config
    (`config=True`, the default: adds `--config` and `--set`), else as `main(args)`;
    `check`, called the same way, validates the rest of the command line before TensorFlow
    is imported. `tensorflow` (default: `config`) says whether `run` imports TensorFlow
    before `main`. Other keywords go to argparse (`usage`, `epilog`, ...); abbreviated flags
    are off, as absl had them.
    """

    def __init__(self, prog: str | None = None, doc: str | None = None,
                 main: Callable | None = None, *, config: bool = True,
                 tensorflow: bool | None = None, check: Callable | None = None, **kwargs):
        self.main, self.check = main, check
        self.reads_config = config
        self.imports_tensorflow = config if tensorflow is None else tensorflow
        self._overrides: list[tuple[str, str]] = []  # (dest, config key)
        self._subcommands: argparse.Action | None = None  # add_subparsers' action
        if doc and "description" not in kwargs:
            kwargs["description"] = doc.strip().split("\n\n")[0]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, **kwargs)
        if config:
            self.add_argument("--config", default="config.json", metavar="PATH",
                              help="the JSON config: Madry's keys plus madry_ns keys "
                                   "(default: ./config.json)")
            self.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override a config key; the value is parsed as JSON, "
                                   "else taken as a string (repeatable)")

    def add_override(self, flag: str, key: str, **kwargs) -> argparse.Action:
        """A flag that stands for `--set KEY=VALUE` (applied after the `--set` ones), such as
        a suite's `--num_examples N` for `num_eval_examples`; unset (None) means no override."""
        action = self.add_argument(flag, default=None, **kwargs)
        self._overrides.append((action.dest, key))
        return action

    def add_subparsers(self, **kwargs):
        """argparse's subcommands (each a `Parser`; default dest `command`, required)."""
        kwargs.setdefault("dest", "command")
        kwargs.setdefault("required", True)
        self._subcommands = super().add_subparsers(**kwargs)
        return self._subcommands

    def command(self, args: argparse.Namespace) -> Parser:
        """The parser of the (sub)command `args` were parsed for."""
        parser = self
        while parser._subcommands is not None:
            name = getattr(args, parser._subcommands.dest, None)
            if name is None:
                break
            parser = parser._subcommands.choices[name]
        return parser

    def load_config(self, args: argparse.Namespace) -> config_lib.Config:
        """The config named by `--config`, with the `--set` and override flags applied."""
        overrides = list(args.set)
        for dest, key in self._overrides:
            value = getattr(args, dest)
            if value is not None:
                overrides.append(f"{key}={value}")
        return config_lib.load(args.config, overrides)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._new_spellings(args), namespace)

    def parse_args(self, args=None, namespace=None):
        # argparse's, with the closest known flag named for an unknown one.
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.command(namespace)
            known = [s for a in command._actions for s in a.option_strings]
            hints = []
            for arg in unknown:
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
            command.error("unrecognized arguments: " + " ".join(hints))
        return namespace

    def _new_spellings(self, args: list[str]) -> list[str]:
        """`args` with every dashed spelling of a flag of this parser replaced by the
        underscore one, noting each replaced flag once on stderr."""
        old = {s.replace("_", "-"): s for action in self._actions
               for s in action.option_strings if s.startswith("--") and "_" in s}
        new, noted = [], set()
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is positional
                return new + args[i:]
            name, equals, value = arg.partition("=")
            if name in old:
                if name not in noted:
                    noted.add(name)
                    print(f"note: {name} is now {old[name]}", file=sys.stderr)
                arg = old[name] + equals + value
            new.append(arg)
        return new


def run(parser: Parser, argv: Sequence[str] | None = None) -> int:
    """Run the command `parser` describes on `argv` (default: `sys.argv[1:]`): parse, load
    and validate the config, check, import TensorFlow quietly, call main. Returns main's exit
    status (None counts as 0); user errors exit the process (`SystemExit`, status 2)."""
    args = parser.parse_args(argv)
    command = parser.command(args)
    if command.main is None:
        raise TypeError(f"{command.prog}: no main given to its Parser")

    def go(_):
        try:
            inputs = (command.load_config(args), args) if command.reads_config else (args,)
            if command.check is not None:
                command.check(*inputs)
            if command.imports_tensorflow:
                import_tensorflow_quietly()
            return command.main(*inputs)
        except UsageError as e:  # a command line that does not fit together
            command.error(str(e))

    status = report_user_errors(go, [])
    return 0 if status is None else int(status)


# `pip install madry_ns` alone leaves TensorFlow's build to the user (setup.cfg's extras).
NO_TENSORFLOW = ("TensorFlow is not installed. Install madry_ns with the build for this machine: "
                 "pip install 'madry_ns[cpu]' (tensorflow-cpu) or 'madry_ns[gpu]' "
                 "(tensorflow[and-cuda]); in a checkout, pip install -c constraints.txt -e "
                 "'.[cpu]' (README, Installing)")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features) kept off the
    console, so Madry's lines stay readable; the banner is shown if the import fails, and a
    missing TensorFlow is a `UserError` saying how to install it."""
    if sys.modules.get("tensorflow") is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
        except BaseException as e:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            if isinstance(e, ModuleNotFoundError) and e.name == "tensorflow":
                raise UserError(NO_TENSORFLOW) from None
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tf.get_logger().setLevel("ERROR")


def report_user_errors(main: Callable[[list], int | None], argv: list):
    """`main(argv)`, ending the process with `error: ...` on stderr and the error's exit
    status (2) on a `UserError`, without a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
