"""The evaluation suite: every attack of the norm-shaping paper under every inference mode.

    python -m madry_ns.evaluate --config CONFIG [--checkpoint PATH] [--attacks ...] [--modes ...]
    python -m madry_ns.evaluate ablation --config CONFIG --checkpoints A B ... --labels ...
    python -m madry_ns.evaluate compare OUTPUT_DIR_A OUTPUT_DIR_B [--names A B]

A robustness number for a defense that depends on batch statistics is only as good as the
strongest attack that knows how the defense works. The first command lays out the paper's
Tables I/II for one checkpoint (rows: attacks; columns: BN, PN and BN+Shaping inference;
clean accuracy first) and puts the attacks that know the defense in the same table:

* transfer rows, generated once against population statistics (PN) and then classified under
  every column, as the paper did (FGSM at the config's epsilon and at 16, PGD and MIM through
  CleverHans 4, CW-L2, DeepFool); in the PN column they are white-box;
* the shaping attack: PGD through batch statistics with 3 clean test images per attacked one
  (each batch split into 4 groups, each attacked with the other 3 as its clean company);
* adaptive rows, generated through each column's own forward: PGD (for BN+Shaping with the
  very reference images the defense uses for that batch: the exact adaptive attack), PGD with
  the attacker's own reference draw (the paper's "slightly weaker" one), EOT-PGD over K
  reference draws, and AutoAttack (`--autoattack`: by default the earlier ensemble APGD-CE,
  APGD-T, Square on fixed batches; `standard`, `plus`, `rand`, `custom` on survivors in
  per-image columns and on fixed batches elsewhere).

Under each table: the per-image worst case over the attacks within the config's L-inf budget,
the time each attack took, and sanity checks against gradient masking (accuracy at a huge
epsilon, more steps and restarts, white-box vs transfer, dependence on the evaluation batch
size), each flagged when it fails. Everything is seeded: a rerun repeats itself.

The second command is the paper's Table IV: checkpoints (one per training ratio) under the
inference ratios 1:0 ... 1:49, with PGD generated on PN (the paper's protocol) beside the
exact adaptive PGD through the shaped forward, as Markdown, JSON and a PNG heat map.

The third compares two finished suites on the same images image by image: per column, how
many images each model keeps under its worst case that the other loses, with the exact sign
test of that split (two accuracies on the same 100 images are not independent samples).

The package's parts, one concern each: `suite` (settings, the compiled forwards and attacks,
the main loop, a checkpoint in and files out), `rows` (the attack rows as data), `resume`
(`--resume`'s state), `sanity` (the gradient-masking checks), `reports` (results.md/json,
compare, the ablation's tables; no TensorFlow) and `cli`. The second command is the shaping
study's (`madry_ns.studies.shaping`; `madry_ns.evaluate.ablation` is its earlier name).
"""

from madry_ns.evaluate.api import Result, evaluate_model
from madry_ns.evaluate.cli import main
from madry_ns.evaluate.reports import (ablation_heatmap, ablation_markdown, compare,
                                       compare_markdown, markdown, sign_test, write_results)
from madry_ns.evaluate.resume import ResumeState, load_previous, read_suite
from madry_ns.evaluate.rows import ROW, Row, register, unregister
from madry_ns.evaluate.sanity import noise_margin, sanity_checks
from madry_ns.evaluate.suite import (MODES, Settings, Suite, check_modes, column_label,
                                     column_short, per_image, row_epsilon, row_label, run,
                                     run_suite)

# The suite's entry point under the name earlier versions exported.
evaluate = run_suite

__all__ = ["ABLATION_RATIOS", "MODES", "ROW", "Result", "ResumeState", "Row", "Settings", "Suite",
           "ablation", "ablation_heatmap", "ablation_markdown", "check_modes", "column_label",
           "column_short", "compare", "compare_markdown", "evaluate", "evaluate_model",
           "load_previous", "main", "markdown", "noise_margin", "per_image", "read_suite",
           "register", "row_epsilon", "row_label", "run", "run_ablation", "run_suite",
           "sanity_checks", "sign_test", "unregister", "write_results"]


def __getattr__(name):
    """The shaping study's Table IV names, where earlier versions had them (imported on first
    use: the study imports this package's suite)."""
    if name in ("ABLATION_RATIOS", "ablation", "run_ablation"):
        from madry_ns.studies import shaping

        return getattr(shaping, name)
    raise AttributeError(f"module 'madry_ns.evaluate' has no attribute '{name}'")
