"""The three studies the toolkit reproduces, each one module of the same shape.

Every study module has:

* ``PAPER``: what it reproduces (authors, title, venue, which tables);
* ``Settings``: a frozen dataclass of what the study runs besides the config, checked on
  construction (a bad value is a `ConfigError` naming the flag);
* ``run(...)``: the whole study from checkpoints or configs to files in an output folder,
  resumable (finished parts are kept, stopped ones continued) and atomic in every write;
* ``table(result)``: its Markdown table, from the result `run` returns (and writes as JSON);
* ``main(argv=None)``: its command line, ``python -m madry_ns.studies.<name>``, in the one
  convention of `madry_ns.cli`.

The studies:

==========  ==============================================  ===================================
name        what                                            earlier command (still works)
==========  ==============================================  ===================================
shaping     norm shaping, Table IV: training x inference    ``python -m madry_ns.evaluate
            ratios, PN-generated beside adaptive PGD        ablation``
fragile     fragile features, Table 2: BN-only regimes,     ``python -m madry_ns.fragile``
            plus the folded-BN figures (`fragile_bn`)
rna         RNA under four protocols (a)-(d), with the      ``python rna_eval.py``
            spread over fresh random paths
==========  ==============================================  ===================================

The shaping paper's Tables I and II (one model, every attack, every inference mode) are the
evaluation suite's (`madry_ns.evaluate`), which every study builds on. Modules are imported
when asked for (`get`), so listing the studies imports no TensorFlow.
"""

from __future__ import annotations

import importlib

# name -> module; adding a study is one entry here plus its module and its test.
STUDIES = {
    "shaping": "madry_ns.studies.shaping",
    "fragile": "madry_ns.studies.fragile",
    "rna": "madry_ns.studies.rna",
}
# What every study module provides (tests/test_studies.py checks it).
SHAPE = ("PAPER", "Settings", "run", "table", "main")


def get(name: str):
    """The study module `name` (one of `STUDIES`)."""
    from madry_ns.errors import ConfigError

    if name not in STUDIES:
        raise ConfigError(f"unknown study '{name}'; the studies are {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
