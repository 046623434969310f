"""`--resume`: what an earlier, stopped run of the suite left in its output folder.

A suite folder holds `results.json` (rows, settings, labels) and `per_image.npz` (each image's
outcome per row and column). `ResumeState.load` reads both and refuses, naming the key, when
the checkpoint, images, model, columns or any setting differ; `reusable_rows` then checks that
this run sees the same labels and clean predictions image by image, so reused rows and new
ones describe one experiment. Folders written before the columns took the config's names
('bn', 'pn') are read under the new ones (`migrate`). No TensorFlow here.
"""

from __future__ import annotations

import json
import os

import numpy as np

from madry_ns.errors import ConfigError

# The settings that must match for --resume to reuse a row (the attack list and the sanity
# switch may change: rows are reused by key, and the sanity checks rerun unless identical).
_RESUME_IGNORED = ("attacks", "sanity")
_IDENTITY_KEYS = ("checkpoint", "num_examples", "dataset", "model", "columns")
# per_image.npz names of the sanity checks' attacks (`sanity.Parts`), kept for a resume.
SANITY_PREFIX = "sanity__"
# per_image.npz names of the batches made so far of the row a stopped run was inside
# (`RowParts`): `partial__G__correct__COLUMN` and `partial__G__move__STAT` for generation G.
PARTIAL_PREFIX = "partial__"
# Column names of results folders written before the columns took the config's vocabulary.
_OLD_COLUMNS = {"bn": "batch", "pn": "population"}


def _renamed(mapping: dict) -> dict:
    return {_OLD_COLUMNS.get(k, k): v for k, v in mapping.items()}


def migrate(saved: dict, arrays: dict) -> tuple:
    """(results.json, per_image arrays) with the columns under their current names.

    Earlier versions keyed columns 'bn' and 'pn' (now 'batch' and 'population', as the config
    says); the numbers and labels are the same, so a stored folder still resumes, compares
    and reproduces. Only column keys change, never a value. Folders of `--autoattack rand`
    written before `apgd_eot_samples` applied to it record 1 draw but ran AutoAttack's 20:
    their settings say 20.
    """
    settings = saved.get("settings")
    if isinstance(settings, dict) and settings.get("autoattack") == "rand" \
            and settings.get("apgd_eot_samples") == 1:
        saved = {**saved, "settings": {**settings, "apgd_eot_samples": 20}}
    if not any(k in _OLD_COLUMNS for k in saved.get("columns", {})):
        return saved, arrays
    saved = dict(saved)
    for key in ("columns", "clean", "worst_case"):
        if isinstance(saved.get(key), dict):
            saved[key] = _renamed(saved[key])
    if isinstance(saved.get("settings"), dict) and "modes" in saved["settings"]:
        saved["settings"] = {**saved["settings"], "modes": [
            _OLD_COLUMNS.get(m, m) for m in saved["settings"]["modes"]]}
    rows = []
    for row in saved.get("rows", []):
        row = {**row, "accuracy": _renamed(row["accuracy"])}
        if isinstance(row.get("perturbation"), dict) and any(
                k in _OLD_COLUMNS for k in row["perturbation"]):
            row["perturbation"] = _renamed(row["perturbation"])
        rows.append(row)
    saved["rows"] = rows
    if isinstance(saved.get("sanity"), dict) and "checks" in saved["sanity"]:
        saved["sanity"] = {**saved["sanity"], "checks": _renamed(saved["sanity"]["checks"])}
    renamed = {}
    for name, value in arrays.items():
        head, sep, mode = name.rpartition("__")
        renamed[f"{head}{sep}{_OLD_COLUMNS.get(mode, mode)}" if sep else name] = value
    return saved, renamed


def _setting_defaults() -> dict:
    """The suite's settings at their defaults, as results.json writes them: a results.json
    written before a setting existed lacks it and was made with its default (each new
    setting's default is chosen to be what the suite did before it existed)."""
    import dataclasses

    from madry_ns.evaluate.suite import Settings

    # The defaults as a Settings made with them holds them (`apgd_eot_samples` resolved).
    made = Settings()
    return json.loads(json.dumps({f.name: getattr(made, f.name)
                                  for f in dataclasses.fields(Settings)
                                  if f.default is not dataclasses.MISSING}))


def read_suite(output_dir: str, who: str) -> tuple | None:
    """(results.json, per_image.npz arrays, path of results.json) of a suite's output folder,
    or None when it has no results.json; unreadable or missing per-image files are a
    ConfigError that starts with `who` (the option or command that needed them)."""
    path = os.path.join(output_dir, "results.json")
    arrays_path = os.path.join(output_dir, "per_image.npz")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{who}: cannot read {path}: {e}") from None
    if not os.path.exists(arrays_path):
        raise ConfigError(f"{who}: {path} has no per_image.npz beside it (written by an "
                          f"older version), so its per-image outcomes are unknown; run the "
                          f"suite again into another --output")
    try:
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{who}: cannot read {arrays_path}: {e}") from None
    saved, arrays = migrate(saved, arrays)
    return saved, arrays, path


class RowParts:
    """What one row has made so far, batch by batch and per generation (a row made through
    each column's forward has one generation per column): each judged column's per-image
    outcomes and each image's distances (the suite's `_moves`). Saved after every batch, so
    that a run stopped inside a long row (EOT through BN+Shaping: 356 s per 100
    Fashion-MNIST images in docs/fashion_mnist.md's probe) resumes after its last finished
    batch; the batches' attacks are seeded by batch index, so the resumed row equals an
    uninterrupted one."""

    def __init__(self, key: str, saved: dict | None = None, seconds: float = 0.0):
        self.key, self.seconds = key, float(seconds)
        # generation -> name -> [arrays, one per batch (one for all batches saved earlier)]
        self.parts = {g: {name: [v] for name, v in names.items()}
                      for g, names in (saved or {}).items()}

    def batches_done(self, g: int, sizes: list) -> int:
        """How many leading batches (of `sizes` images each) generation g already has;
        a count that does not end on a batch boundary is a ConfigError (another batching)."""
        images = sum(map(len, next(iter(self.parts[g].values())))) if g in self.parts else 0
        made = np.cumsum([0] + list(sizes))
        if images not in made:
            raise ConfigError(f"--resume: row {self.key} was stopped after {images} images "
                              f"of generation {g}, not a whole number of this run's batches "
                              f"({sizes}); drop --resume")
        return int(np.searchsorted(made, images))

    def add(self, g: int, values: dict) -> None:
        """One more batch of generation g: {'correct__COLUMN' or 'move__STAT': array}."""
        for name, v in values.items():
            self.parts.setdefault(g, {}).setdefault(name, []).append(np.asarray(v))

    def get(self, g: int, name: str) -> np.ndarray:
        """Generation g's `name` ('correct__COLUMN' or 'move__STAT') over its batches so far."""
        return np.concatenate(self.parts[g][name])

    def arrays(self) -> dict:
        """The parts as per_image.npz arrays (`PARTIAL_PREFIX`)."""
        return {f"{PARTIAL_PREFIX}{g}__{name}": np.concatenate(v)
                for g, names in self.parts.items() for name, v in names.items()}

    @classmethod
    def from_arrays(cls, key: str, arrays: dict, seconds: float) -> "RowParts":
        """Row `key`'s parts as `arrays` (per_image.npz) holds them, `seconds` spent so far."""
        saved: dict = {}
        for name, value in arrays.items():
            if name.startswith(PARTIAL_PREFIX):
                g, rest = name[len(PARTIAL_PREFIX):].split("__", 1)
                saved.setdefault(int(g), {})[rest] = value
        return cls(key, saved, seconds)


class ResumeState:
    """The rows of an earlier run that this run may reuse.

    Attributes: `rows` (key -> row of results.json, only rows with every column's per-image
    outcomes), `correct` ((row, column) -> per-image bool), `labels`, `clean` (column ->
    per-image bool), `sanity` (the sanity checks of a finished run, else None),
    `sanity_parts` (name -> per-image bool of each check's attack that finished, so that
    stopped checks resume), `in_row` (the `RowParts` of the row the run was stopped inside,
    or None), `saved` (the whole results.json) and `path`. Item access
    (`state["rows"]`) reads the same attributes.
    """

    def __init__(self, saved: dict, arrays: dict, path: str):
        self.saved, self.path = saved, path
        self.correct = {}
        self.sanity_parts = {name[len(SANITY_PREFIX):]: value for name, value in arrays.items()
                             if name.startswith(SANITY_PREFIX)}
        for name, value in arrays.items():
            if "__" in name and not name.startswith(("clean__", SANITY_PREFIX, PARTIAL_PREFIX)):
                key, mode = name.split("__", 1)
                self.correct[(key, mode)] = value
        self.rows = {r["key"]: r for r in saved.get("rows", [])
                     if all((r["key"], m) in self.correct for m in r["accuracy"])}
        self.labels = arrays.get("labels")
        self.clean = {k.split("__", 1)[1]: v for k, v in arrays.items()
                      if k.startswith("clean__")}
        self.sanity = None if "incomplete" in saved else saved.get("sanity")
        inside = (saved.get("incomplete") or {}).get("row_in_progress")
        self.in_row = RowParts.from_arrays(inside["key"], arrays, inside["seconds"]) \
            if inside else None

    def row_parts(self, key: str) -> RowParts:
        """The batches of row `key` an earlier run made before it was stopped (none unless
        it was stopped inside that row)."""
        return self.in_row if self.in_row and self.in_row.key == key else RowParts(key)

    def __getitem__(self, name: str):
        return getattr(self, name)

    @classmethod
    def load(cls, output_dir: str, expected: dict) -> "ResumeState | None":
        """The state in `output_dir`, or None when it has none. `expected` holds this run's
        `checkpoint`, `num_examples`, `dataset`, `model`, `columns` and `settings`; any
        difference is a ConfigError naming it, since reusing rows made under other settings
        would mix two experiments in one table."""
        expected = json.loads(json.dumps(expected))  # tuples as lists, as results.json has
        found = read_suite(output_dir, "--resume")
        if found is None:
            return None
        saved, arrays, path = found
        for key in _IDENTITY_KEYS:
            if saved.get(key) != expected[key]:
                raise ConfigError(f"--resume: {path} has {key} {saved.get(key)!r}, this run "
                                  f"{expected[key]!r}; use another --output or drop --resume")
        made_with = {**_setting_defaults(), **saved.get("settings", {})}
        for key, value in expected["settings"].items():
            if key not in _RESUME_IGNORED and made_with.get(key) != value:
                raise ConfigError(f"--resume: {path} was made with {key} "
                                  f"{made_with.get(key)!r}, this run "
                                  f"{value!r}; use another --output or drop --resume")
        return cls(saved, arrays, path)

    def already_done(self, settings) -> bool:
        """Whether this is a finished run with exactly `settings`' rows (and its sanity checks
        when asked for): then --resume has nothing to add and rewriting the files would only
        relabel a finished table as carried over."""
        from madry_ns.evaluate.rows import ROW

        columns = list(self.saved.get("columns", {}))  # this run's, as `load` checked
        wanted = [k for k in settings.attacks if ROW[k].cells(settings, columns)]
        return ("incomplete" not in self.saved
                and [r["key"] for r in self.saved.get("rows", [])] == wanted
                and set(wanted) <= self.rows.keys()
                and bool(self.sanity) == settings.sanity)


def load_previous(output_dir: str, expected: dict) -> ResumeState | None:
    """`ResumeState.load` (the name earlier versions exported)."""
    return ResumeState.load(output_dir, expected)


def reusable_rows(previous, labels, clean: dict) -> dict:
    """The reusable rows of `previous`, after checking that this run sees the same images
    and classifies them the same way (else the model, data or code changed)."""
    if previous["labels"] is None or not np.array_equal(previous["labels"], labels):
        raise ConfigError(f"--resume: the labels in {previous['path']}'s per_image.npz are not "
                          f"those of this run's test images; drop --resume")
    for m, v in clean.items():
        if m not in previous["clean"] or not np.array_equal(previous["clean"][m], v):
            raise ConfigError(f"--resume: the clean predictions under {m} differ from those "
                              f"in {previous['path']}: the model, data or code changed; "
                              f"drop --resume")
    return previous["rows"]
