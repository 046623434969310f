"""The layout of madry_ns.attacks: old import names, one budget vocabulary, the map."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

import madry_ns.attacks
from madry_ns import attacks, autoattack, config

# Every public name of the former modules madry_ns/attacks.py and madry_ns/autoattack.py.
OLD_ATTACKS_NAMES = (
    "PIXEL_MIN", "PIXEL_MAX", "xent_loss", "cw_loss", "LOSSES", "check_params", "pgd",
    "pgd_attack", "config_params", "compile_pgd", "compile_attack", "fgsm", "cleverhans_pgd",
    "mim", "deepfool", "carlini_wagner_l2", "eot_pgd")
OLD_AUTOATTACK_NAMES = (
    "SQUARE_P_HALVINGS", "dlr_loss", "dlr_loss_targeted", "apgd", "apgd_targeted", "square_p",
    "square", "ATTACKS", "autoattack_style")

# The iterative attacks; FGSM is one step and has no budget of iterations.
ITERATIVE = ("pgd", "linf_ascent", "pgd_attack", "eot_pgd", "cleverhans_pgd", "mim",
             "deepfool", "carlini_wagner_l2", "apgd", "apgd_targeted", "apgd_single_run",
             "square", "autoattack_style")
OLD_SPELLINGS = ("max_iter", "max_iterations", "num_queries", "n_queries", "nb_iter", "n_iter",
                 "iterations", "num_iter")


def _submodules():
    return [importlib.import_module(f"madry_ns.attacks.{m.name}")
            for m in pkgutil.iter_modules(madry_ns.attacks.__path__)]


def _public_functions():
    for module in _submodules():
        for name, value in vars(module).items():
            if (inspect.isfunction(value) and not name.startswith("_")
                    and value.__module__ == module.__name__):
                yield module, name, value


@pytest.mark.parametrize("name", OLD_ATTACKS_NAMES)
def test_old_attacks_names_resolve_to_the_package_definitions(name):
    value = getattr(attacks, name)
    if callable(value):
        home = importlib.import_module(value.__module__)
        assert home.__name__.startswith("madry_ns.attacks.")
        assert getattr(home, name) is value
    assert name in attacks.__all__


@pytest.mark.parametrize("name", OLD_AUTOATTACK_NAMES)
def test_old_autoattack_names_are_the_packages(name):
    assert getattr(autoattack, name) is getattr(attacks, name)
    assert name in autoattack.__all__


def test_old_import_statements_still_work():
    from madry_ns.attacks import pgd, xent_loss
    from madry_ns.autoattack import apgd, autoattack_style

    assert (pgd, xent_loss) == (attacks.pgd, attacks.xent_loss)
    assert (apgd, autoattack_style) == (attacks.apgd, attacks.autoattack_style)
    assert isinstance(pgd, types.FunctionType)  # the function, not a module


def test_every_public_function_is_re_exported_and_no_module_is_shadowed():
    for module, name, value in _public_functions():
        assert getattr(attacks, name) is value, f"{module.__name__}.{name}"
    for module in _submodules():
        short = module.__name__.rsplit(".", 1)[1]
        assert isinstance(getattr(attacks, short), types.ModuleType), short


def test_the_package_docstring_maps_every_module():
    lines = attacks.__doc__.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("-----"))) + 1:]
    table = table[:table.index("")]
    mapped = {line.split("`")[1] for line in table if line.startswith("`")}
    assert mapped == {m.__name__.rsplit(".", 1)[1] for m in _submodules()}


@pytest.mark.parametrize("name", ITERATIVE)
def test_every_iterative_attack_takes_num_steps(name):
    assert "num_steps" in inspect.signature(getattr(attacks, name)).parameters


def test_no_function_of_the_package_keeps_an_old_budget_spelling():
    for module, name, fn in _public_functions():
        params = set(inspect.signature(fn).parameters)
        assert not params & set(OLD_SPELLINGS), f"{module.__name__}.{name}: {params}"
        # a second iteration budget names its attack: square_num_steps
        assert all(p == "num_steps" or p.endswith("_num_steps") or "iter" not in p
                   for p in params), name


def test_losses_are_keyed_by_the_configs_vocabulary():
    assert set(attacks.LOSSES) == {"xent", "cw", "dlr"}
    assert set(config.LOSS_FUNCS) <= set(attacks.LOSSES)
    assert attacks.LOSSES["dlr"] is attacks.dlr_loss
    assert inspect.signature(attacks.apgd).parameters["loss"].default == "xent"
    assert set(attacks.APGD_LOSSES) <= set(attacks.LOSSES)
    with pytest.raises(ValueError, match=r"loss must be one of \['dlr', 'xent'\], got 'ce'"):
        attacks.apgd(lambda z: z, [[0.0]], [0], epsilon=1.0, num_steps=1, loss="ce")
    with pytest.raises(ValueError, match="loss_func must be one of"):
        attacks.pgd_attack(None, [[0.0]], [0], epsilon=1.0, num_steps=1, step_size=1.0,
                           loss_func="ce")


@pytest.mark.parametrize("attack", ["deepfool", "carlini_wagner_l2", "square"])
def test_budget_errors_name_num_steps(attack):
    with pytest.raises(ValueError, match="num_steps must be a"):
        getattr(attacks, attack)(lambda z: z, [[0.0]], [0], num_steps=-1,
                                 **({"epsilon": 1.0} if attack == "square" else {}))
