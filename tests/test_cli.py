"""The one command-line convention (`madry_ns.cli`): every command's --help, the underscore
spelling with the dashed one as an alias that notes itself once, user errors as `error: ...`
with status 2, unknown flags refused with a hint. In-process and fast: where a main would
run, TensorFlow's start and the work itself are stubbed."""

from __future__ import annotations

import functools
import os
import runpy

import pytest

from madry_ns import cli
from madry_ns.errors import UsageError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADRY_CONFIG = os.path.join(ROOT, "tests", "data", "madry_config.json")
DIGITS_RNA = os.path.join(ROOT, "configs", "rna", "digits_resnet18.json")


def _script_main(name):
    return runpy.run_path(os.path.join(ROOT, name), run_name="cli_test")["main"]


def _module_main(name):
    import importlib

    return importlib.import_module(f"madry_ns.{name}").main


# (command, how to get its main, arguments before --help, reads a config)
COMMANDS = [
    ("train.py", lambda: _script_main("train.py"), [], True),
    ("eval.py", lambda: _script_main("eval.py"), [], True),
    ("pgd_attack.py", lambda: _script_main("pgd_attack.py"), [], True),
    ("run_attack.py", lambda: _script_main("run_attack.py"), [], True),
    ("rna_eval.py", lambda: _script_main("rna_eval.py"), [], True),
    ("fetch_model.py", lambda: _script_main("fetch_model.py"), [], False),
    ("madry_ns.studies.fragile", lambda: _module_main("studies.fragile"), [], False),
    ("madry_ns.studies.rna", lambda: _module_main("studies.rna"), [], True),
    ("madry_ns.studies.shaping", lambda: _module_main("studies.shaping"), [], True),
    ("madry_ns.analysis", lambda: _module_main("analysis"), [], False),
    ("madry_ns.analysis table", lambda: _module_main("analysis"), ["table"], False),
    ("madry_ns.analysis bn", lambda: _module_main("analysis"), ["bn"], False),
    ("madry_ns.benchmark", lambda: _module_main("benchmark"), [], False),
    ("madry_ns.evaluate", lambda: _module_main("evaluate"), [], True),
    ("madry_ns.evaluate ablation", lambda: _module_main("evaluate"), ["ablation"], True),
    ("madry_ns.evaluate compare", lambda: _module_main("evaluate"), ["compare"], False),
    ("madry_ns.train", lambda: _module_main("train"), [], True),
    ("madry_ns.eval", lambda: _module_main("eval"), [], True),
    ("madry_ns.pgd_attack", lambda: _module_main("pgd_attack"), [], True),
    ("madry_ns.run_attack", lambda: _module_main("run_attack"), [], True),
    ("madry_ns.rna_eval", lambda: functools.partial(_module_main("studies.rna"),
                                                    prog="python -m madry_ns.rna_eval"),
     [], True),
    ("madry_ns.fetch_model", lambda: _module_main("fetch_model"), [], False),
]
# Every command of an installed package, as `python -m madry_ns.<name>` runs it.
MODULE_COMMANDS = ["train", "eval", "pgd_attack", "run_attack", "rna_eval", "fetch_model",
                   "evaluate", "fragile", "analysis", "benchmark"]


@pytest.mark.parametrize("name, get_main, before, reads_config", COMMANDS,
                         ids=[c[0] for c in COMMANDS])
def test_every_help_shows_the_description_and_config_flags_where_read(
        name, get_main, before, reads_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_main()(before + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python ") and name.split()[-1] in out.splitlines()[0]
    assert ("--config PATH" in out) == reads_config
    assert ("--set KEY=VALUE" in out) == reads_config
    flags = [w for w in out.replace("[", " ").replace("]", " ").split() if w.startswith("--")]
    assert all("-" not in f[2:].split("=")[0] for f in flags), flags  # underscores only
    if name.endswith(".py"):  # the docstring's first paragraph, as argparse wraps it
        assert "cifar10_challenge" in out or "RNA" in out


def _toy(main, **kwargs):
    parser = cli.Parser("python toy.py", "A toy command.\n\nMore text.", main, **kwargs)
    parser.add_argument("--aa_steps", type=int, default=1)
    parser.add_argument("--no_wide", action="store_true")
    return parser


def test_old_dashed_spelling_works_and_notes_itself_once(capsys):
    seen = []
    parser = _toy(seen.append, config=False)
    assert cli.run(parser, ["--aa-steps", "3", "--no-wide", "--aa-steps=4"]) == 0
    assert seen[0].aa_steps == 4 and seen[0].no_wide
    assert capsys.readouterr().err.splitlines() == ["note: --aa-steps is now --aa_steps",
                                                    "note: --no-wide is now --no_wide"]
    # Both argparse forms of a value; no note for the new spelling.
    assert cli.run(parser, ["--aa_steps=5"]) == 0 and seen[1].aa_steps == 5
    assert cli.run(parser, ["--aa_steps", "6"]) == 0 and seen[2].aa_steps == 6
    assert capsys.readouterr().err == ""
    # After `--`, arguments are positional and left as they are.
    positional = cli.Parser("python toy.py", "Toy.", seen.append, config=False)
    positional.add_argument("--aa_steps")
    positional.add_argument("rest", nargs="*")
    cli.run(positional, ["--", "--aa-steps"])
    assert seen[-1].rest == ["--aa-steps"] and capsys.readouterr().err == ""


def test_fragile_reads_its_old_flag_spellings(monkeypatch, capsys):
    from madry_ns import fragile

    got = {}
    monkeypatch.setattr(cli, "import_tensorflow_quietly", lambda: None)
    monkeypatch.setattr(fragile, "run", lambda *a: got.setdefault("args", a))
    digits = os.path.join(ROOT, "configs", "fragile", "digits")
    assert fragile.main([digits, "--output", "out", "--num-robust-examples", "30",
                         "--aa-steps", "7", "--pgd-step-size", "4", "--no-analysis",
                         "--rows", "normal"]) == 0
    config_dir, output, settings, rows, analysis = got["args"]
    assert (config_dir, output, rows, analysis) == (digits, "out", ["normal"], False)
    assert (settings.num_robust_examples, settings.aa_steps, settings.pgd_step_size) == (
        30, 7, 4.0)
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --num-robust-examples is now --num_robust_examples",
                   "note: --aa-steps is now --aa_steps",
                   "note: --pgd-step-size is now --pgd_step_size",
                   "note: --no-analysis is now --no_analysis"]


def test_config_is_loaded_with_set_and_override_flags_before_tensorflow(monkeypatch):
    order = []
    monkeypatch.setattr(cli, "import_tensorflow_quietly", lambda: order.append("tensorflow"))
    parser = cli.Parser("python toy.py", "Toy.", lambda config, args: order.append(config),
                        check=lambda config, args: order.append("check"))
    parser.add_override("--num_examples", "num_eval_examples", type=int)
    cli.run(parser, ["--config", MADRY_CONFIG, "--set", "num_eval_examples=7",
                     "--set", "epsilon=4"])
    check, tensorflow, config = order
    assert (check, tensorflow) == ("check", "tensorflow")
    assert (config.num_eval_examples, config.epsilon) == (7, 4.0)
    order.clear()
    cli.run(parser, ["--config", MADRY_CONFIG, "--set", "num_eval_examples=7",
                     "--num-examples", "5"])  # the override flag comes after --set
    assert order[-1].num_eval_examples == 5


def test_subcommands_each_with_their_main_and_config(monkeypatch, capsys):
    monkeypatch.setattr(cli, "import_tensorflow_quietly", lambda: None)
    seen = []
    parser = cli.Parser("python -m toy", "Toy.", config=False)
    sub = parser.add_subparsers()
    ablation = sub.add_parser("ablation", doc="Table IV.", main=lambda c, a: seen.append(c))
    ablation.add_argument("--ratios", type=cli.comma_list, default=("0", "1"))
    sub.add_parser("compare", doc="Two suites.", config=False, tensorflow=False,
                   main=lambda a: seen.append(a.command))
    cli.run(parser, ["ablation", "--config", MADRY_CONFIG, "--set", "epsilon=2"])
    assert seen.pop().epsilon == 2.0
    cli.run(parser, ["compare"])
    assert seen.pop() == "compare"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(parser, ["compare", "--config", MADRY_CONFIG])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --config" in capsys.readouterr().err


def test_bad_set_value_is_an_error_line_with_status_2(tmp_path, capsys):
    train = _script_main("train.py")
    for bad, message in [("loss_func=l1", "key 'loss_func' has value \"l1\""),
                         ("epsilon", "--set 'epsilon': expected key=value")]:
        with pytest.raises(SystemExit) as exit_info:
            train(["--config", MADRY_CONFIG, "--set", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_user_and_usage_errors_of_main(capsys):
    def fails(args):
        raise UserError("no such thing: x")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(_toy(fails, config=False), [])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: no such thing: x\n"

    def misused(args):
        raise UsageError("--aa_steps excludes --no_wide")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(_toy(misused, config=False), ["--no_wide"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: python toy.py")
    assert err.endswith("python toy.py: error: --aa_steps excludes --no_wide\n")


@pytest.mark.parametrize("script, args, hint", [
    ("eval.py", ["--onc"], "--onc (did you mean --once?)"),
    ("train.py", ["--num_steps", "3"], "--num_steps"),  # a config key, not a flag
    ("train.py", ["extra"], "extra"),                    # absl passed these on unread
    ("rna_eval.py", ["--apgd_step", "3"], "--apgd_step (did you mean --apgd_steps?)"),
    ("train.py", ["--conf", "x.json"], "--conf"),        # no abbreviations, as absl
])
def test_unknown_flags_are_refused_with_a_clear_message(script, args, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script_main(script)(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: unrecognized arguments: {hint}" in err and "Traceback" not in err


def test_rna_eval_protocols_are_comma_separated(monkeypatch):
    from madry_ns import rna_eval

    got = {}
    monkeypatch.setattr(cli, "import_tensorflow_quietly", lambda: None)
    monkeypatch.setattr(rna_eval, "evaluate_checkpoint",
                        lambda config, checkpoint, settings, output, resume: got.update(
                            checkpoint=checkpoint, settings=settings, output=output,
                            resume=resume))
    main = _script_main("rna_eval.py")
    assert main(["--config", DIGITS_RNA, "--protocols", "paper, eot", "--repeats", "3",
                 "--checkpoint", "m/checkpoint-4", "--resume"]) == 0
    assert got["settings"].protocols == ("paper", "eot") and got["settings"].repeats == 3
    assert got["checkpoint"] == "m/checkpoint-4" and got["output"] is None and got["resume"]
    main(["--config", DIGITS_RNA])
    assert got["settings"] == rna_eval.Settings()  # unset flags keep the defaults
    assert got["resume"] is False


def test_comma_list_drops_blanks():
    assert cli.comma_list(" a, b,,c ") == ("a", "b", "c")
    assert cli.comma_list("") == ()


@pytest.mark.filterwarnings("ignore:'madry_ns.*' found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("name", MODULE_COMMANDS)
def test_python_dash_m_runs_every_command(name, monkeypatch, capsys):
    """`python -m madry_ns.<name> --help`, in-process: the module's `__main__` guard (the
    package's `__main__.py` for evaluate) calls its main."""
    import sys

    monkeypatch.setattr("sys.argv", [name, "--help"])
    # As in a fresh process: the earlier names (fragile, rna_eval) are, once imported, the
    # study modules themselves, whose loaders cannot run under the old name.
    monkeypatch.delitem(sys.modules, f"madry_ns.{name}", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"madry_ns.{name}", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m madry_ns.{name} ")


def test_an_installed_command_runs_outside_a_checkout(tmp_path):
    """No top-level script on the path: the package alone (it ships every command)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "madry_ns.train", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m madry_ns.train ")


def test_a_missing_tensorflow_is_a_user_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorflow", None)  # import fails
    with pytest.raises(UserError, match=r"madry_ns\[cpu\]'.*madry_ns\[gpu\]'"):
        cli.import_tensorflow_quietly()
