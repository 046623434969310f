"""The suite's tables and files: results.md, results.json and per_image.npz, the ablation's
Markdown and heat map, and `compare` (two finished suites, image by image, with the sign
test). No TensorFlow here: reports can be made and checked on a machine without it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from madry_ns.errors import ConfigError
from madry_ns.evaluate.resume import read_suite


def pct(v) -> str:
    """A fraction as a percentage with two decimals, '-' for a missing cell."""
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(result: dict) -> str:
    """results.md: the paper's Table I/II layout with honest labels and the sanity flags."""
    modes = list(result["columns"])
    short = {m: result["columns"][m].split(" (")[0] for m in modes}
    lines = [f"# Evaluation: {result.get('checkpoint', 'model')}", ""]
    if "checkpoint" in result:
        lines += [f"Step {result['step']}, first {result['num_examples']} test images of "
                  f"{result['dataset']}, made by `{result['command']}` on {result['time']}.", ""]
    if result.get("resumed_rows"):
        lines += [f"Rows carried over from an earlier run of the same checkpoint and "
                  f"settings (`--resume`, clean predictions checked image by image): "
                  f"{', '.join(result['resumed_rows'])}.", ""]
    if "incomplete" in result:
        todo = result["incomplete"]["pending_attacks"] + (
            ["the sanity checks"] if result["incomplete"]["sanity_pending"] else [])
        inside = result["incomplete"].get("row_in_progress")
        made = (f" ({inside['key']}: {' + '.join(map(str, inside['batches']))} of "
                f"{inside['of']} batches per generation made, kept for --resume)"
                if inside else "")
        lines += [f"**Incomplete**: the evaluation is still running or was stopped; still to "
                  f"run: {', '.join(todo)}{made}. The worst case covers only the rows below.",
                  ""]
    lines += ["Accuracy (%) of each attack's examples under each inference mode (columns).",
              "", "| attack | " + " | ".join(short[m] for m in modes) + " | seconds |",
              "|---|" + "---|" * (len(modes) + 1),
              "| clean | " + " | ".join(pct(result["clean"][m]) for m in modes) + " | |"]
    for row in result["rows"]:
        lines.append(f"| {row['attack']} | " + " | ".join(
            pct(row["accuracy"].get(m)) for m in modes) + f" | {row['seconds']:.1f} |")
    worst = result["worst_case"]
    lines.append("| **worst case per image (L-inf attacks within eps)** | " + " | ".join(
        f"**{pct(worst[m]['per_image'])}**" for m in modes) + " | |")
    lines += ["", "Columns (how each image is classified):", ""]
    lines += [f"* **{short[m]}**: {result['columns'][m]}" for m in modes]
    lines += ["", "Rows (how each attack's examples are made):", ""]
    for row in result["rows"]:
        p = row["perturbation"]
        dist = p if "linf_max" in p else next(iter(p.values()))
        size = f"median L2 {dist['l2_median']:.2f}"
        if dist.get("perturbed", 1.0) < 1.0:  # CW leaves images it could not attack clean
            size = (f"{100 * dist['perturbed']:.1f}% of the images perturbed, median L2 of "
                    f"those {dist['l2_median_perturbed'] or 0:.2f}")
        lines.append(f"* **{row['attack']}**: {row['generation']}. Largest L-inf "
                     f"{dist['linf_max']:.2f}, {size} (0-255 scale).")
    lines += ["", "The worst case counts an image as robust only if it is classified correctly "
              "clean and under every L-inf attack of the column within the config's epsilon "
              f"({result['settings']['epsilon']:g}); CW-L2 and DeepFool (unbounded L2) and FGSM "
              "at a larger epsilon are other threat models and stay out of it.", ""]
    if "random_paths" in result:  # RNA: which cells the worst case combines
        lines += [result["random_paths"]["worst_case"], ""]
    if "sanity" in result:
        lines += _sanity_markdown(result, short)
    return "\n".join(lines) + "\n"


def _sanity_markdown(result: dict, short: dict) -> list:
    sanity = result["sanity"]
    lines = ["## Sanity checks against gradient masking", ""]
    if sanity["flags"]:
        lines += ["**FLAGGED:**", ""] + [f"* {f}" for f in sanity["flags"]] + [""]
    else:
        lines += ["No check flagged.", ""]
    lines += ["| check | " + " | ".join(short[m] for m in sanity["checks"]) + " |",
              "|---|" + "---|" * len(sanity["checks"])]
    checks = sanity["checks"]

    def mark(entry):
        return " (FLAG)" if entry.get("flag") else ""

    def cells(fn):
        return " | ".join(fn(c) for c in checks.values())

    lines.append("| adaptive PGD | " + cells(lambda c: pct(c["adaptive_pgd"])) + " |")
    for eps in ("2x", "4x", "255"):
        lines.append(f"| adaptive PGD, eps {eps} | " + cells(
            lambda c: pct(c["large_epsilon"]["accuracy"][eps]) +
            (mark(c["large_epsilon"]) if eps == "255" else "")) + " |")
    some = next(iter(checks.values()))["more_steps"]
    lines.append(f"| PGD-{some['num_steps']}, {some['restarts']} starts | " + cells(
        lambda c: pct(c["more_steps"]["accuracy"]) + mark(c["more_steps"])) + " |")
    lines.append("| strongest transfer row | " + cells(
        lambda c: (pct(min(c["white_box_vs_transfer"]["transfer"].values())) +
                   mark(c["white_box_vs_transfer"])) if "white_box_vs_transfer" in c else "-")
        + " |")
    lines.append("| adaptive PGD by eval batch size | " + cells(
        lambda c: ", ".join(f"{s}: {pct(v['adaptive_pgd'])}"
                            for s, v in c["batch_size"]["accuracy"].items()) +
        mark(c["batch_size"])) + " |")
    lines += ["", "Flags: accuracy above 5% at eps 255; more steps and restarts raising accuracy "
              "by more than two binomial standard errors plus one image; a transfer attack "
              "beating the adaptive one by that margin; PN accuracy moving with the batch size "
              "by that margin (BN and BN+Shaping depend on the batch by design: reported only).",
              ""]
    return lines


def write_results(result: dict, output_dir: str, arrays: dict | None = None) -> None:
    """results.json and results.md (and per_image.npz when `arrays` are given, first, so
    that every row in results.json has its per-image outcomes), each written atomically."""
    from madry_ns import files

    os.makedirs(output_dir, exist_ok=True)
    if arrays is not None:
        with files.atomic_open(os.path.join(output_dir, "per_image.npz"), "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write_text(os.path.join(output_dir, "results.json"),
                            json.dumps(result, indent=2) + "\n")
    files.atomic_write_text(os.path.join(output_dir, "results.md"), markdown(result))



_GRID_TITLES = {"clean": "clean accuracy",
                "transfer": "PGD generated on PN, classified BN+Shaping (the paper's Table IV)",
                "adaptive": "exact adaptive PGD through BN+Shaping (the defense's references)"}


def ablation_markdown(result: dict, command: str = "") -> str:
    """The grid in the paper's Table IV layout, one table per kind; a cell not measured yet
    (a grid that is still running) shows '-'."""
    ratios = result["ratios"]
    lines = ["# Ablation: training ratio x inference ratio (paper Table IV layout)", ""]
    if command:
        attacked = result.get("attack_examples")
        attacks = (f" (the attacks on the first {attacked})" if attacked is not None else "")
        lines += [f"Made by `{command}`: first {result['num_examples']} test images of "
                  f"{result['dataset']}{attacks}, eval batch {result['eval_batch_size']}, PGD-"
                  f"{result['num_steps']} eps {result['epsilon']:g} step "
                  f"{result['step_size']:g}.", ""]
    for kind, title in _GRID_TITLES.items():
        lines += [f"## {title} (%)", "",
                  "| training \\ inference | " + " | ".join(f"1:{r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for label in result["checkpoints"]:
            cells = result["grid"][kind].get(label, {})
            lines.append(f"| {label} | " + " | ".join(pct(cells.get(str(r))) for r in ratios)
                         + " |")
        lines.append("")
    missing = _missing_cells(result)
    if missing:  # a grid still being measured (each cell is saved as it finishes)
        lines += [f"'-': not measured yet ({missing} of "
                  f"{len(ratios) * len(result['checkpoints'])} cells).", ""]
    return "\n".join(lines)


def _missing_cells(result: dict) -> int:
    grid = result["grid"]
    return sum(not all(str(r) in grid[kind].get(label, {}) for kind in _GRID_TITLES)
               for label in result["checkpoints"] for r in result["ratios"])


def ablation_heatmap(result: dict, path: str) -> None:
    """One heat-map panel per grid (clean, transfer, adaptive), written atomically."""
    from madry_ns import files

    plt = files.pyplot()
    ratios = result["ratios"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(result["checkpoints"]) + 2.2))
    for ax, (kind, title) in zip(axes, _GRID_TITLES.items()):
        labels = list(result["checkpoints"])
        values = np.array([[100 * result["grid"][kind].get(l, {}).get(str(r), np.nan)
                            for r in ratios] for l in labels])
        ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (a, b), v in np.ndenumerate(values):
            ax.text(b, a, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if np.isnan(v) or v < 60 else "black", fontsize=8)
        ax.set_xticks(range(len(ratios)))
        ax.set_xticklabels([f"1:{r}" for r in ratios])
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)
        ax.set_xlabel("inference ratio (test:clean)")
        ax.set_ylabel("training model")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)



def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of `a` images robust only under one
    model against `b` robust only under the other: the chance of a split at least this
    uneven if either model were equally likely to keep a discordant image."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _robust_per_image(saved: dict, arrays: dict, mode: str, path: str) -> np.ndarray:
    """The worst case per image of one column, rebuilt from per_image.npz with the rows
    results.json counted in it."""
    robust = np.ones(saved["num_examples"], bool)
    for key in ["clean"] + saved["worst_case"][mode]["attacks"]:
        name = f"{key}__{mode}"
        if name not in arrays:
            raise ConfigError(f"compare: {path} counts {key} in its {mode} worst case but "
                              f"the per_image.npz beside it has no {name}")
        robust &= arrays[name]
    return robust


def compare(dir_a: str, dir_b: str, names: tuple = ("A", "B")) -> dict:
    """The per-image worst case of two finished suites on the same test images, column by
    column: how many images each keeps that the other loses, and the sign test of that split.
    Both must have run the same attacks at the same epsilon on the same images, so that the
    only difference left is the model."""
    suites = []
    for d in (dir_a, dir_b):
        found = read_suite(d, "compare")
        if found is None:
            raise ConfigError(f"compare: {d} has no results.json; give a folder written by "
                              f"python -m madry_ns.evaluate --output")
        saved, arrays, path = found
        if "incomplete" in saved:
            raise ConfigError(f"compare: {path} is an unfinished run; finish it with "
                              f"python -m madry_ns.evaluate ... --output {d} --resume")
        suites.append((saved, arrays, path))
    (sa, aa, pa), (sb, ab, pb) = suites
    for key in ("num_examples", "dataset"):
        if sa.get(key) != sb.get(key):
            raise ConfigError(f"compare: {key} differs: {pa} has {sa.get(key)!r}, "
                              f"{pb} {sb.get(key)!r}; compare suites on the same images")
    if not np.array_equal(aa.get("labels"), ab.get("labels")):
        raise ConfigError(f"compare: the labels in {pa} and {pb} differ image by image; "
                          f"compare suites on the same images")
    if sa["settings"].get("epsilon") != sb["settings"].get("epsilon"):
        raise ConfigError(f"compare: epsilon differs: {sa['settings'].get('epsilon')} in "
                          f"{pa}, {sb['settings'].get('epsilon')} in {pb}")
    columns = [m for m in sa["columns"] if sb["columns"].get(m) == sa["columns"][m]]
    if not columns:
        raise ConfigError(f"compare: {pa} and {pb} share no inference column with the same "
                          f"label: {list(sa['columns'].values())} against "
                          f"{list(sb['columns'].values())}")
    rows = {}
    for m in columns:
        attacks_a, attacks_b = (s["worst_case"][m]["attacks"] for s in (sa, sb))
        if attacks_a != attacks_b:
            raise ConfigError(f"compare: column {m}: the worst case of {pa} counts "
                              f"{attacks_a}, that of {pb} {attacks_b}; run the same attacks")
        ra, rb = _robust_per_image(sa, aa, m, pa), _robust_per_image(sb, ab, m, pb)
        only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
        rows[m] = {"label": sa["columns"][m], "accuracy": [float(ra.mean()), float(rb.mean())],
                   "both": int((ra & rb).sum()), "only": [only_a, only_b],
                   "neither": int((~ra & ~rb).sum()), "sign_test_p": sign_test(only_a, only_b)}
    return {"names": list(names), "suites": [pa, pb], "num_examples": sa["num_examples"],
            "dataset": sa["dataset"], "epsilon": sa["settings"].get("epsilon"),
            "attacks": {m: sa["worst_case"][m]["attacks"] for m in columns}, "columns": rows}


def compare_markdown(result: dict) -> str:
    a, b = result["names"]
    lines = [f"# {a} against {b}: worst case per image", "",
             f"{a}: `{result['suites'][0]}`; {b}: `{result['suites'][1]}`. The same first "
             f"{result['num_examples']} test images of {result['dataset']}; an image counts as "
             f"robust if it is right clean and under every L-inf attack of the column within "
             f"eps {result['epsilon']:g}. The sign test counts only the test images' noise, "
             f"not that of training (each model is one run).", "",
             f"| column | {a} (%) | {b} (%) | robust under both | only {a} | only {b} | "
             f"sign test p |", "|---|---|---|---|---|---|---|"]
    for row in result["columns"].values():
        lines.append(f"| {row['label'].split(' (')[0]} | {pct(row['accuracy'][0])} | "
                     f"{pct(row['accuracy'][1])} | {row['both']} | {row['only'][0]} | "
                     f"{row['only'][1]} | {row['sign_test_p']:.3g} |")
    return "\n".join(lines) + "\n"



# ------------------------------------------------------------------------------------------
# RobustBench's model-info file

# The fields of RobustBench's model_info/<dataset>/<threat>/<Name>.json, in its order, with
# their types (its published files, e.g. cifar10/Linf/Madry2018Towards.json).
ROBUSTBENCH_FIELDS = (("link", str), ("name", str), ("authors", str),
                      ("additional_data", bool), ("number_forward_passes", int),
                      ("dataset", str), ("venue", str), ("architecture", str), ("eps", str),
                      ("clean_acc", str), ("reported", str), ("autoattack_acc", str))
ROBUSTBENCH_IMAGES = 10000  # RobustBench evaluates on the full CIFAR test set


def _eps_text(epsilon: float) -> str:
    """The 0-255 budget as RobustBench writes it: '8/255', else the 0-1 value ('0.031')."""
    if abs(epsilon - round(epsilon)) < 1e-9:
        return f"{int(round(epsilon))}/255"
    return f"{epsilon / 255:.4g}"


def robustbench_info(saved: dict, arrays: dict, *, name: str, authors: str, link: str,
                     venue: str, architecture: str, dataset: str,
                     additional_data: bool = False, reported: str | float = "",
                     number_forward_passes: int = 1, column: str = "population",
                     footnote: str | None = None) -> dict:
    """A RobustBench model-info record of a finished suite with an AutoAttack row.

    `clean_acc` and `autoattack_acc` come from column `column`, which must be a deterministic
    per-image forward (RobustBench's threat model: the model is a fixed function of one image;
    a batch-statistics, shaped or random forward would make its number depend on the
    evaluation's batches or draws). `autoattack_acc` counts images right clean and under the
    AutoAttack row, per image. The footnote says when the ensemble is not the standard
    AutoAttack or fewer than 10,000 images were used; `footnote` is added after it.
    `reported` is the paper's own robust accuracy, in %, as RobustBench lists it.
    """
    from madry_ns import inference

    if saved.get("incomplete"):
        raise ConfigError("robustbench: the suite is unfinished; finish it (--resume) first")
    mode = inference.get(column)
    if column not in saved["columns"]:
        raise ConfigError(f"robustbench: column {column!r} is not in this suite (it has "
                          f"{', '.join(saved['columns'])})")
    if not mode.per_image or mode.draws:
        raise ConfigError(f"robustbench: column {column!r} classifies with "
                          f"{saved['columns'][column]}: not a deterministic per-image forward, "
                          f"so RobustBench's format cannot hold its number; use 'population'")
    row = next((r for r in saved["rows"] if r["key"] == "autoattack"), None)
    if row is None or f"autoattack__{column}" not in arrays:
        raise ConfigError("robustbench: the suite has no autoattack row; run it with "
                          "--attacks including autoattack")
    robust = arrays[f"clean__{column}"] & arrays[f"autoattack__{column}"]
    notes = []
    version = saved.get("settings", {}).get("autoattack")
    if version != "standard":
        notes.append(f"Evaluated with madry_ns's {row['attack']} ({row['generation']}), not "
                     f"the standard AutoAttack.")
    if saved["num_examples"] < ROBUSTBENCH_IMAGES:
        notes.append(f"On the first {saved['num_examples']} test images, not all "
                     f"{ROBUSTBENCH_IMAGES:,}.")
    if footnote:
        notes.append(footnote)
    info = {"link": link, "name": name, "authors": authors,
            "additional_data": bool(additional_data),
            "number_forward_passes": int(number_forward_passes), "dataset": dataset,
            "venue": venue, "architecture": architecture,
            "eps": _eps_text(float(saved["settings"]["epsilon"])),
            "clean_acc": f"{100 * float(arrays[f'clean__{column}'].mean()):.2f}",
            "reported": reported if isinstance(reported, str) else f"{reported:.2f}",
            "autoattack_acc": f"{100 * float(robust.mean()):.2f}"}
    if notes:
        info["footnote"] = "<br>".join(notes)
    return info


def write_robustbench(info: dict, path: str) -> None:
    """Write a model-info record as RobustBench's files are (one JSON object), atomically."""
    from madry_ns import files

    files.atomic_write_text(path, json.dumps(info, indent=2) + "\n")
