"""The README and configs stay true to the code."""

import glob
import json
import os
import re

import pytest

from madry_ns import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_opens_with_exactly_the_two_setup_commands_and_ci_runs_the_second():
    block = re.search(r"```\n(.*?)```", _readme(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "train.py --config configs/quickstart.json" in commands[0]
    assert "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert commands[1] in f.read()


def test_readme_configuration_table_matches_the_config_fields():
    assert config.readme_table() in _readme()


def test_readme_datasets_table_lists_every_registered_dataset_with_its_shape():
    from madry_ns import data

    section = _readme().split("\n## Datasets\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")][1:]  # not the header
    names = [row[0].strip("`") for row in rows]
    assert names == list(data.REGISTRY) + [data.TFDS_PREFIX + "<name>"]
    for row in rows[:-1]:
        spec = data.REGISTRY[row[0].strip("`")]
        assert row[1] == "x".join(map(str, spec.image_shape)), row[0]
        assert row[2] == str(spec.num_classes), row[0]


def test_root_config_is_madry_plus_every_default():
    loaded = config.load(os.path.join(ROOT, "config.json"))
    assert loaded == config.from_dict({})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"),
                                                  recursive=True)))
def test_every_shipped_config_loads(path):
    config.load(path)


def test_local_links_in_the_readme_and_docs_point_to_files():
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to {target}"


def _tables(text: str) -> list:
    """The Markdown tables of `text`, each as its list of lines."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_digits_evaluation_tables_are_those_the_suite_wrote():
    """docs/evaluation_digits.md copies its tables from the suites' folders in docs/evaluation/:
    each results.md is the suite's own rendering of the results.json beside it, and the
    image-by-image comparisons are recomputed from their per_image.npz."""
    from madry_ns import evaluate

    with open(os.path.join(ROOT, "docs", "evaluation_digits.md"), encoding="utf-8") as f:
        doc = f.read()
    folders = sorted(glob.glob(os.path.join(ROOT, "docs", "evaluation", "*", "results.json")))
    names = [os.path.basename(os.path.dirname(p)) for p in folders]
    assert {"madry", "shaping_madry", "trades", "shaping_trades"} <= set(names)
    for name, path in zip(names, folders):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        with open(path[:-len("json")] + "md", encoding="utf-8") as f:
            rendered = f.read()
        assert evaluate.markdown(saved) == rendered, name
        assert f"**{name}** (" in doc, name
        section = doc.split(f"**{name}** (", 1)[1]
        assert _tables(section)[:2] == _tables(rendered)[:2], name  # results and sanity
    for base, shaped in (("madry", "shaping_madry"), ("trades", "shaping_trades")):
        result = evaluate.compare(*(os.path.join(ROOT, "docs", "evaluation", n)
                                    for n in (base, shaped)), names=(base, shaped))
        table = _tables(evaluate.compare_markdown(result))[0]
        assert "\n".join(table) in doc, (base, shaped)
    with open(os.path.join(ROOT, "docs", "evaluation", "ablation", "ablation.json"),
              encoding="utf-8") as f:
        grid = json.load(f)
    with open(os.path.join(ROOT, "docs", "evaluation", "ablation", "ablation.md"),
              encoding="utf-8") as f:
        rendered = f.read()
    assert evaluate.ablation_markdown(grid, grid["command"]) == rendered
    for table in _tables(rendered):
        assert "\n".join(table) in doc


FRAGILE_TABLES = sorted(
    os.path.dirname(p) for pattern in (("fragile", "**"), ("fashion_mnist", "fragile"))
    for p in glob.glob(os.path.join(ROOT, "docs", *pattern, "table.json"), recursive=True))


@pytest.mark.parametrize("folder", FRAGILE_TABLES)
def test_the_fragile_features_tables_are_those_the_study_wrote(folder):
    """Each stored table.md is the study's own rendering of the table.json beside it, and
    every row the doc that cites it (docs/fragile_features.md, or docs/fashion_mnist.md for
    the Fashion-MNIST record) shows from it is one of its rows, word for word."""
    from madry_ns.studies import fragile

    with open(os.path.join(folder, "table.json"), encoding="utf-8") as f:
        records = json.load(f)["rows"]
    with open(os.path.join(folder, "table.md"), encoding="utf-8") as f:
        rendered = f.read()
    assert fragile.table(records) == rendered
    rows = {line for line in rendered.splitlines() if line.startswith("| ")}
    labels = {line.split(" | ")[0] for line in rows}
    page = "fashion_mnist.md" if "fashion_mnist" in folder else "fragile_features.md"
    with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
        doc = f.read()
    relative = os.path.relpath(os.path.join(folder, "table.md"), os.path.join(ROOT, "docs"))
    assert f"`docs/{relative}`" in doc, f"docs/{page} does not cite {relative}"
    section = doc.split(f"`docs/{relative}`", 1)[1]
    shown = [line for line in _tables(section)[0][2:]]
    assert shown and all(line.split(" | ")[0] in labels for line in shown)
    assert all(line in rows for line in shown)


def test_the_rna_suite_table_is_the_one_the_suite_wrote():
    """docs/rna_digits.md shows the suite's table of the digits RNA model as stored in
    docs/rna_suite/: results.md is the suite's rendering of results.json, and the doc's
    results and sanity tables are its own."""
    from madry_ns import evaluate

    folder = os.path.join(ROOT, "docs", "rna_suite")
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    with open(os.path.join(folder, "results.md"), encoding="utf-8") as f:
        rendered = f.read()
    assert evaluate.markdown(saved) == rendered
    assert set(saved["columns"]) == {"population_fresh_path", "population_attack_path"}
    with open(os.path.join(ROOT, "docs", "rna_digits.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("## The evaluation suite on the RNA model", 1)[1]
    assert _tables(section)[:2] == _tables(rendered)[:2]


FASHION = os.path.join(ROOT, "docs", "fashion_mnist")


def _fashion_doc() -> str:
    with open(os.path.join(ROOT, "docs", "fashion_mnist.md"), encoding="utf-8") as f:
        return f.read()


def test_the_fashion_mnist_probe_is_the_one_the_suite_wrote():
    """docs/fashion_mnist.md's probe of the Madry model: its table is the suite's own (the
    stored results.md renders the stored results.json), and every sanity line it quotes is a
    line the suite printed (console.txt)."""
    from madry_ns import evaluate

    folder = os.path.join(FASHION, "pgd7_probe")
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    with open(os.path.join(folder, "results.md"), encoding="utf-8") as f:
        rendered = f.read()
    assert evaluate.markdown(saved) == rendered
    assert saved["dataset"].startswith("fashion_mnist") and saved["num_examples"] == 100
    section = _fashion_doc().split("## A first probe of the first Madry model", 1)[1]
    assert "`docs/fashion_mnist/pgd7_probe/`" in section
    assert _tables(section)[0] == _tables(rendered)[0]
    with open(os.path.join(folder, "console.txt"), encoding="utf-8") as f:
        console = set(f.read().splitlines())
    quoted = [line for line in section.splitlines() if line.startswith("sanity ")]
    assert len(quoted) == 2 and all(line in console for line in quoted)
    # The retrained model's recheck: the same rows, image count and distances as the probe's.
    with open(os.path.join(folder, "recheck", "results.json"), encoding="utf-8") as f:
        again = json.load(f)
    with open(os.path.join(folder, "recheck", "results.md"), encoding="utf-8") as f:
        assert evaluate.markdown(again) == f.read()
    assert again["checkpoint"] == saved["checkpoint"] and again["num_examples"] == 100
    assert again["clean"] == saved["clean"]
    probe = {row["key"]: row for row in saved["rows"]}
    assert [row["key"] for row in again["rows"]] == ["fgsm", "pgd"]
    for row in again["rows"]:
        assert {k: v for k, v in row.items() if k != "seconds"} == \
            {k: v for k, v in probe[row["key"]].items() if k != "seconds"}, row["key"]


def _kept_models() -> list:
    folder = os.path.join(FASHION, "models")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("name", _kept_models())
def test_each_kept_fashion_mnist_model_is_its_configs_finished_training(name):
    """docs/fashion_mnist/models/NAME (kept by fashion_mnist.sh, since $MODELS does not
    survive a session) holds one checkpoint: the final one of the config the doc names, with
    every setting of configs/fashion_mnist/NAME.json apart from model_dir, and the step its
    optimizer counted is max_num_training_steps."""
    import tensorflow as tf

    folder = os.path.join(FASHION, "models", name)
    norm = re.fullmatch(r"rna_(\w+)", name)
    source = os.path.join(ROOT, "configs", "fashion_mnist",
                          "rna_resnet20.json" if norm else f"{name}.json")
    expected = config.load(source, [f"norm_layer={norm.group(1)}"] if norm else [])
    kept = config.load(os.path.join(folder, "config.json"))
    differ = {k for k, v in kept.to_dict().items() if expected.to_dict()[k] != v}
    assert differ == {"model_dir"}
    path = tf.train.latest_checkpoint(folder)
    assert path == os.path.join(folder, f"checkpoint-{expected.max_num_training_steps}")
    reader = tf.train.load_checkpoint(path)
    steps = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
             if k.startswith("optimizer/_iterations/")]
    assert steps == [expected.max_num_training_steps]
    with open(os.path.join(folder, "train.log"), encoding="utf-8") as f:
        assert f"Step {expected.max_num_training_steps - 100}:" in f.read()


TABLE1 = sorted(glob.glob(os.path.join(FASHION, "table1", "*", "suite", "results.json")))


@pytest.mark.parametrize("path", TABLE1, ids=lambda p: p.split(os.sep)[-3])
def test_the_fashion_mnist_table1_is_the_one_the_suite_wrote(path):
    """docs/fashion_mnist.md's Table I section for model NAME copies the table of
    docs/fashion_mnist/table1/NAME/suite (the suite's own rendering of its results.json, made
    on the kept model), and quotes eval.py's clean accuracy on 10,000 images once it is there."""
    from madry_ns import evaluate

    folder = os.path.dirname(os.path.dirname(path))
    name = os.path.basename(folder)
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    with open(os.path.join(os.path.dirname(path), "results.md"), encoding="utf-8") as f:
        rendered = f.read()
    assert evaluate.markdown(saved) == rendered
    assert saved["checkpoint"].endswith(f"/{name}/checkpoint-900")
    assert saved["num_examples"] == 1000
    section = _fashion_doc().split("\n## Table I", 1)[1].split("\n## ", 1)[0]
    section = section.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
    assert _tables(section)[0] == _tables(rendered)[0]
    clean = os.path.join(folder, "clean_10000.txt")
    if os.path.exists(clean):
        with open(clean, encoding="utf-8") as f:
            natural = [line.strip() for line in f if line.strip().startswith("natural:")]
        assert natural and natural[-1] in section


def _assert_paired_rows(table: list, keys: dict, first: dict, second: dict) -> None:
    """Each row of `table` (labelled by `keys`' labels, in order) holds the first and the
    second model's accuracy, second - first, and its paired standard error (%, 2 places),
    from their per-image outcomes `first[key]`, `second[key]`."""
    import numpy as np

    rows = table[2:]
    assert [r.split("|")[1].strip() for r in rows] == list(keys)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        a, b = first[keys[cells[0]]], second[keys[cells[0]]]
        d = b - a
        expected = [100 * a.mean(), 100 * b.mean(), 100 * d.mean(),
                    100 * d.std(ddof=1) / np.sqrt(len(d))]
        assert [float(c) for c in cells[1:]] == [round(v, 2) for v in expected], cells[0]


def test_the_fashion_mnist_paired_comparisons_are_computed_from_the_per_image_outcomes():
    """Table I's paired tables (madry_pgd vs shaping_pgd, trades vs shaping_trades, the two
    models named in each header): each row's two accuracies, their difference and its paired
    standard error, recomputed from the two suites' per_image.npz."""
    import numpy as np

    section = _fashion_doc().split("### What the rows so far say", 1)[1].split("\n## ", 1)[0]
    keys = {"BN+Shaping 1:9, clean": "clean__shaped", "PN, clean": "clean__population",
            "BN+Shaping 1:9, PGD generated on PN (the paper's protocol)": "pgd__shaped",
            "PN, PGD (white-box)": "pgd__population", "PN, adaptive PGD": "adaptive__population",
            "BN+Shaping 1:9, adaptive PGD (the exact shaped forward)": "adaptive__shaped"}
    tables = _tables(section)
    pairs = [tuple(c.split()[0] for c in t[0].strip("|").split("|")[1:3]) for t in tables]
    assert pairs == [("madry_pgd", "shaping_pgd"), ("trades", "shaping_trades")]
    for pair, table in zip(pairs, tables):
        outcomes = [np.load(os.path.join(FASHION, "table1", name, "suite", "per_image.npz"),
                            allow_pickle=False) for name in pair]
        _assert_paired_rows(table, keys, *(
            {k: o[k].astype(float) for k in keys.values()} for o in outcomes))


def test_the_fashion_mnist_table_iv_grids_are_those_of_its_ablation_json():
    """The Table IV section shows the paper's grid, then the study's three grids exactly as
    `shaping.table` renders docs/fashion_mnist/table4/ablation.json (cells not run yet as
    '-'), for the four checkpoints and six inference ratios the issue asks for; and it says
    'In progress' for as long as a cell is missing."""
    from madry_ns.studies import shaping

    with open(os.path.join(FASHION, "table4", "ablation.json"), encoding="utf-8") as f:
        grid = json.load(f)
    assert {label: os.path.basename(path) for label, path in grid["checkpoints"].items()} == {
        "1:0": "madry_pgd", "1:1": "shaping_pgd_r1", "1:3": "shaping_pgd",
        "1:7": "shaping_pgd_r7"}
    assert grid["ratios"] == [0, 1, 3, 9, 19, 49]
    assert (grid["num_examples"], grid["attack_examples"]) == (10000, 1000)
    section = _fashion_doc().split("## Table IV: training ratio x inference ratio", 1)[1]
    section = section.split("\n## ", 1)[0]
    rendered = shaping.table(grid)
    tables = _tables(section)
    assert tables[0][2].startswith("| 1:1 | 0.477 |")  # the paper's, then ours
    assert tables[1:] == _tables(rendered)
    assert ("not measured yet" in rendered) == ("**In progress**" in section)


FRAGILE_KEPT = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(
    os.path.join(FASHION, "fragile", "models", "*", "fragile_eval.json")))


@pytest.mark.parametrize("key", FRAGILE_KEPT)
def test_each_kept_fashion_mnist_fragile_row_is_its_configs_finished_training(key):
    """docs/fashion_mnist/fragile/models/KEY holds the final checkpoint of
    configs/fragile/fashion_mnist/KEY.json, unchanged, and the evaluation of that checkpoint
    with the settings docs/experiments/fashion_mnist.sh passes."""
    import dataclasses

    import tensorflow as tf

    from madry_ns.studies import fragile

    folder = os.path.join(FASHION, "fragile", "models", key)
    expected = config.load(os.path.join(ROOT, "configs", "fragile", "fashion_mnist",
                                        f"{key}.json"))
    kept = config.load(os.path.join(folder, "config.json"))
    assert kept.to_dict() == expected.to_dict()
    final = f"checkpoint-{expected.max_num_training_steps}"
    assert tf.train.latest_checkpoint(folder) == os.path.join(folder, final)
    with open(os.path.join(folder, "fragile_eval.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert (record["row"], os.path.basename(record["checkpoint"])) == (key, final)
    assert record["settings"] == dataclasses.asdict(fragile.Settings(
        num_robust_examples=1000, pgd_steps=20, pgd_step_size=2.55, autoattack="standard"))
    assert record["steps"] == expected.max_num_training_steps


def test_the_fashion_mnist_fragile_table_is_that_of_the_kept_rows():
    """The Fragile features section's table is `fragile.table` of the kept rows' evaluations
    in the paper's order, and the section says 'In progress' until all twelve are in."""
    from madry_ns.studies import fragile

    records = []
    for row in fragile.ROWS:
        path = os.path.join(FASHION, "fragile", "models", row.key, "fragile_eval.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
    section = _fashion_doc().split("## Fragile features: Table 2", 1)[1].split("\n## ", 1)[0]
    assert ("**In progress**" in section) == (len(records) < len(fragile.ROWS))
    if records:
        assert _tables(section)[0] == _tables(fragile.table(records))[0]
    else:
        assert not _tables(section)


RNA_RECORDS = sorted(glob.glob(os.path.join(FASHION, "rna", "*", "rna_eval.jsonl")))


@pytest.mark.parametrize("path", RNA_RECORDS, ids=lambda p: p.split(os.sep)[-2])
def test_the_fashion_mnist_rna_rows_are_those_rna_eval_wrote(path):
    """docs/fashion_mnist.md's RNA section shows, for docs/fashion_mnist/rna/NORM, the rows
    `rna.table` renders from the last line rna_eval.py appended there: the kept rna_NORM
    model's final checkpoint on the first 1,000 test images."""
    from madry_ns.studies import rna

    norm = os.path.basename(os.path.dirname(path))
    with open(path, encoding="utf-8") as f:
        record = json.loads(f.read().splitlines()[-1])
    assert record["checkpoint"].endswith(f"/rna_{norm}/checkpoint-900")
    assert record["num_examples"] == 1000 and record["dataset"].startswith("fashion_mnist")
    section = _fashion_doc().split("\n## RNA", 1)[1].split("\n## ", 1)[0]
    rows = rna.table(record, f"rna_{norm}").splitlines()[2:]
    assert rows and all(row in section for row in rows)


def test_the_fashion_mnist_rna_against_bn_table_is_computed_from_the_per_image_predictions():
    """The RNA section's paired table: per protocol, each model's accuracy (RNA's averaged
    over its draws, image by image), their difference and its paired standard error,
    recomputed from the two runs' per-image files."""
    from madry_ns.studies import rna

    outcomes = {}
    for norm in ("rna", "bn"):
        folder = os.path.join(FASHION, "rna", norm)
        with open(os.path.join(folder, "rna_eval.jsonl"), encoding="utf-8") as f:
            record = json.loads(f.read().splitlines()[-1])
        y, preds = rna.load_per_image(os.path.join(folder, record["per_image"]))
        outcomes[norm] = {k: v.mean(axis=0)
                          for k, v in rna.correct_by_protocol(y, preds).items()}
    section = _fashion_doc().split("\n## RNA", 1)[1].split("\n## ", 1)[0]
    [table] = [t for t in _tables(section) if t[0].startswith("| protocol | rna_bn | rna_rna")]
    keys = {"clean": "clean", "(a) paper": "paper", "(b) fixed path": "fixed",
            "(c) EOT-PGD": "eot", "(d) AutoAttack-EOT": "aa_eot"}
    _assert_paired_rows(table, keys, outcomes["bn"], outcomes["rna"])


def test_the_readme_fashion_mnist_summary_quotes_the_record():
    """README's Fashion-MNIST summary table: every figure in it is one of
    docs/fashion_mnist.md's (whose own tables are checked against the tools' files above)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    part = readme.split("On Fashion-MNIST ([docs/fashion_mnist.md]", 1)[1]
    [table] = _tables(part)[:1]
    doc = _fashion_doc()
    figures = [x for row in table[2:] for x in re.findall(r"[+-]?\d+\.\d+", row)]
    assert len(figures) >= 20
    # Whole figures only: "0.5" must not pass on the strength of "0.51".
    assert [x for x in figures if not re.search(rf"(?<![\d.]){re.escape(x)}(?![\d])", doc)] == []
