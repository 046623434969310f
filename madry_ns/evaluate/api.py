"""`madry_ns.evaluate_model(model, x, y, ...)`: the evaluation suite on arrays, from Python.

    import madry_ns
    result = madry_ns.evaluate_model(model, x_test, y_test, epsilon=8 / 255, pixel_scale=1.0,
                                     attacks=("fgsm", "adaptive"))
    print(result.markdown())
    result.save("eval/suite")        # results.md, results.json, per_image.npz

Any Keras model (or callable) mapping images to logits works, at the pixel scale it was
trained on (`pixel_scale=255.0`: images on 0-255, as every toolkit model; `1.0`: images on
0-1, as most Keras and PyTorch-style models); `epsilon`, `step_size` and the returned
perturbation sizes of `result` are on that same scale. Inside, the suite runs on the 0-255
scale of Madry's code (its labels say "eps 8" for 8/255): images are multiplied by
255 / pixel_scale on the way in and the model sees them divided back.

Columns are inference modes (`madry_ns.inference`): a plain Keras model has one, 'population'
(its `training=False` forward); the toolkit's models also run 'batch' (each test batch's
statistics) and, given `references` (clean training images), 'shaped'. Asking for a mode the
model cannot run is a `ConfigError` naming the mode before any attack runs; so is an attack
that needs the toolkit's BN layers (the shaping attack) on a model without them.

A model with RNA layers runs 'population' and 'batch' on random paths, one path shared by each
batch as released: every mode gives two columns, `MODE_fresh_path` (classified on a path drawn
independently of the attack's, the released protocol) and `MODE_attack_path` (on the
attacker's own path, white-box), see `madry_ns.evaluate.rows`; rows made for BN+Shaping (the
shaping attack, the attacker's own references) are refused.

`python -m madry_ns.evaluate` is a thin shell over this function (`suite.run`): a checkpoint
and a config in, `evaluate_model(..., config=config)`, `Result.save` out.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from madry_ns.errors import ConfigError
from madry_ns.evaluate import reports
from madry_ns.evaluate.rows import ROW, canonical_modes, table_columns
from madry_ns.evaluate.suite import Settings, check_modes, run_suite

# The config keys `evaluate_model` sets from its own arguments when no config is given.
_PGD_DEFAULTS = {"num_steps": 20, "loss": "xent", "random_start": True}


@dataclasses.dataclass
class Result:
    """What `evaluate_model` returns: the suite's results and each image's outcomes.

    `results` is the content of `results.json` (every number with its settings and labels);
    `per_image` the arrays of `per_image.npz` (`labels`, `clean__MODE`, `ROW__MODE`: True
    where the image is classified correctly). The properties below read them.
    """

    results: dict
    per_image: dict

    @property
    def columns(self) -> dict:
        """Column key -> the label that says how its images were classified."""
        return dict(self.results["columns"])

    @property
    def accuracy(self) -> dict:
        """Row key -> column -> accuracy (fraction), 'clean' first."""
        table = {"clean": dict(self.results["clean"])}
        table.update({row["key"]: dict(row["accuracy"]) for row in self.results["rows"]})
        return table

    @property
    def generation(self) -> dict:
        """Row key -> how its adversarial examples were generated."""
        return {row["key"]: row["generation"] for row in self.results["rows"]}

    @property
    def worst_case(self) -> dict:
        """Column -> per-image worst case over the L-inf attacks within epsilon."""
        return {m: w["per_image"] for m, w in self.results["worst_case"].items()}

    @property
    def sanity(self) -> dict | None:
        """The gradient-masking checks (`checks`, `flags`), or None when skipped."""
        return self.results.get("sanity")

    @property
    def seconds(self) -> dict:
        """Row key -> seconds its attack took, and 'total'."""
        out = {row["key"]: row["seconds"] for row in self.results["rows"]}
        out["total"] = self.results.get("seconds")
        return out

    def robust(self, row: str, column: str) -> np.ndarray:
        """Per image: classified correctly under `row`'s examples in `column`."""
        key = f"{row}__{canonical_modes([column])[0]}"
        if key not in self.per_image:
            raise KeyError(f"no outcomes for row {row!r} in column {column!r}; rows: "
                           f"{', '.join(self.accuracy)}; columns: {', '.join(self.columns)}")
        return self.per_image[key]

    def markdown(self) -> str:
        """The table of `results.md` (the paper's Tables I/II layout, labels, checks)."""
        return reports.markdown(self.results)

    def to_json(self) -> str:
        """`results.json`'s text."""
        return json.dumps(self.results, indent=2) + "\n"

    def save(self, folder: str) -> str:
        """Write results.md, results.json and per_image.npz to `folder` (atomically, the
        files `python -m madry_ns.evaluate --output folder` writes); returns `folder`."""
        reports.write_results(self.results, folder, self.per_image)
        return folder

    def to_tensorboard(self, log_dir: str, step: int = 0) -> str:
        """Write the table to TensorBoard in `log_dir`: results.md as the text `suite/table`,
        every accuracy as the scalar `suite/<row>/<column>` ('clean' and 'worst_case' among
        the rows), at `step` (the checkpoint's); returns `log_dir`."""
        import tensorflow as tf

        writer = tf.summary.create_file_writer(log_dir)
        with writer.as_default():
            tf.summary.text("suite/table", self.markdown(), step=step)
            rows = {**self.accuracy, "worst_case": self.worst_case}
            for row, cells in rows.items():
                for column, value in cells.items():
                    tf.summary.scalar(f"suite/{row}/{column}", value, step=step)
        writer.close()
        return log_dir

    @classmethod
    def load(cls, folder: str) -> "Result":
        """The result a suite wrote to `folder` (by `save` or the command line)."""
        from madry_ns.evaluate.resume import read_suite

        found = read_suite(folder, "Result.load")
        if found is None:
            raise ConfigError(f"Result.load: no results.json in {folder}")
        return cls(found[0], found[1])

    def robustbench(self, path: str | None = None, **metadata) -> dict:
        """RobustBench's model-info record (`reports.robustbench_info`: `name`, `authors`,
        `link`, `venue`, `architecture`, `dataset`, optional `additional_data`, `reported`,
        `number_forward_passes`, `column`, `footnote`), written to `path` when given."""
        info = reports.robustbench_info(self.results, self.per_image, **metadata)
        if path is not None:
            reports.write_robustbench(info, path)
        return info

    def to_dataframe(self):
        """A pandas DataFrame: one row per attack ('clean' first), one column per inference
        mode, accuracies as fractions (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Result.to_dataframe needs pandas (pip install pandas); "
                              "Result.accuracy holds the same numbers as a dict") from None
        frame = pd.DataFrame.from_dict(self.accuracy, orient="index")
        frame.index.name = "attack"
        return frame[list(self.columns)]


class _PixelScaled:
    """A model seen by the suite: 0-255 images in, `model(x * pixel_scale / 255)` called.

    A model with the toolkit's BN layers gets `bn_mode`; a plain Keras model is called with
    `training=False` and runs only the population forward (its BN layers' moving averages).
    """

    def __init__(self, model, pixel_scale: float, toolkit_bn: bool):
        self.model, self.factor, self.toolkit_bn = model, float(pixel_scale) / 255.0, toolkit_bn

    def __call__(self, x, bn_mode: str = "population", **kwargs):
        if self.factor != 1.0:
            x = x * self.factor
        if self.toolkit_bn:
            return self.model(x, bn_mode=bn_mode, **kwargs)
        if bn_mode != "population":
            raise ConfigError(f"bn_mode {bn_mode!r} needs the toolkit's BN layers; this model "
                              f"is a plain Keras model")
        return self.model(x, training=False)

    def _flatten_layers(self, *args, **kwargs):  # what inference reads to find BN layers
        if not self.toolkit_bn:
            return []
        return self.model._flatten_layers(*args, **kwargs)

    # RNA's path API (`madry_ns.rna`), for the random-path forwards.
    def rna_layers(self):
        return self.model.rna_layers() if hasattr(self.model, "rna_layers") else []

    def resample(self, seed):
        return self.model.resample(seed)

    @property
    def rna_sampling(self):
        return self.model.rna_sampling


def _on_255(images, scale: float) -> np.ndarray:
    """Images on the suite's 0-255 scale; uint8 images on it already stay uint8 (the shaped
    forward's reference pool is 4x smaller so)."""
    images = np.asarray(images)
    if scale == 1.0 and images.dtype == np.uint8:
        return images
    return images.astype(np.float32) * np.float32(scale)


def _config(config, *, epsilon, scale, num_steps, step_size, loss, random_start, batch_size,
            seed, num_examples, shaping_ratio):
    """The suite's config: the caller's own, or Madry's defaults with this call's PGD."""
    from madry_ns import config as config_lib

    overrides = {"num_eval_examples": num_examples}
    if batch_size is not None:
        overrides["eval_batch_size"] = int(batch_size)
    if seed is not None:
        overrides["np_random_seed"] = int(seed)
    if config is None:
        if epsilon is None:
            raise ConfigError("evaluate_model: epsilon is required (the L-inf budget, on the "
                              "images' pixel scale, e.g. 8/255 with pixel_scale=1.0)")
        eps = float(epsilon) * scale
        overrides.update(
            epsilon=eps, num_steps=int(num_steps or _PGD_DEFAULTS["num_steps"]),
            step_size=float(step_size) * scale if step_size is not None
            else eps / 4, loss_func=loss or _PGD_DEFAULTS["loss"],
            random_start=_PGD_DEFAULTS["random_start"] if random_start is None
            else bool(random_start))
        overrides.setdefault("eval_batch_size", min(100, num_examples))
        if shaping_ratio is not None:
            overrides["inference_ratio"] = int(shaping_ratio)
        base = config_lib.from_dict({}, "evaluate_model")
    else:
        given = {"epsilon": epsilon, "num_steps": num_steps, "step_size": step_size,
                 "loss": loss, "random_start": random_start, "shaping_ratio": shaping_ratio}
        both = [k for k, v in given.items() if v is not None]
        if both:
            raise ConfigError(f"evaluate_model: {', '.join(both)} given beside config=; the "
                              f"config's own values are used, so set them there")
        base = config
    try:
        return base.replace(**overrides)
    except ConfigError as e:
        raise ConfigError(f"evaluate_model: {e}") from None


def _default_modes(toolkit_bn: bool, references, random_paths: bool) -> tuple:
    if not toolkit_bn:
        return ("population",)
    return ("batch", "population", "shaped") if references is not None and not random_paths \
        else ("batch", "population")


def evaluate_model(model, x, y, *, epsilon: float | None = None, pixel_scale: float = 255.0,
                   attacks=None, modes=None, references=None, batch_size: int | None = None,
                   seed: int | None = None, num_steps: int | None = None,
                   step_size: float | None = None, loss: str | None = None,
                   random_start: bool | None = None, shaping_ratio: int | None = None,
                   sanity: bool = True, config=None, source: str | None = None,
                   out=None, previous=None, on_row=None, **budgets) -> Result:
    """Evaluate `model` on images `x` (N, H, W, C) and labels `y` (N,) under the suite's
    attacks and inference modes; returns a `Result`.

    `epsilon` (required without `config`), `step_size` (default epsilon / 4) are on the
    images' `pixel_scale`; PGD runs `num_steps` (default 20) steps of `loss` ('xent' or
    'cw') from a random start. `attacks` are suite rows (`madry_ns.evaluate.ROW`; default:
    every row the model and modes can run), `modes` inference columns (default: every one
    the model can run; see the module docstring), `references` clean training images for
    the 'shaped' column (same scale as `x`), `shaping_ratio` its r of 1:r (default the
    config's 9), `batch_size` the evaluation batch (default 100), `seed` the attacks' seed
    (default the config's np_random_seed). `budgets` are the suite's other settings
    (`cw_steps`, `apgd_steps`, `eot_samples`, ... see `madry_ns.evaluate.Settings`).
    `config` (a `madry_ns.config.Config`) replaces the PGD arguments with its own keys.
    `out` receives the progress lines (default: print; `out=False` for silence);
    `previous` and `on_row` are `run_suite`'s resume state and per-row callback.
    """
    from madry_ns import data, inference, rna
    from madry_ns.evaluate.suite import paths_config

    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if x.ndim != 4 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"evaluate_model: expected images x of shape (N, H, W, C) and N "
                          f"labels y, got x {x.shape} and y {y.shape}")
    if not pixel_scale > 0:
        raise ConfigError(f"evaluate_model: pixel_scale {pixel_scale}: expected the images' "
                          f"maximum value (255.0 or 1.0)")
    scale = 255.0 / float(pixel_scale)
    toolkit_bn = inference.has_toolkit_bn(model)
    modes = canonical_modes(modes) if modes is not None else _default_modes(
        toolkit_bn, references, rna.has_rna(model))
    c = _config(config, epsilon=epsilon, scale=scale, num_steps=num_steps,
                step_size=step_size, loss=loss, random_start=random_start,
                batch_size=batch_size, seed=seed, num_examples=len(y),
                shaping_ratio=shaping_ratio)
    c = paths_config(c, model)  # on random paths the labels say so
    unknown_budgets = sorted(set(budgets) - {f.name for f in dataclasses.fields(Settings)})
    if unknown_budgets:
        raise ConfigError(f"evaluate_model: unknown settings {', '.join(unknown_budgets)}; "
                          f"expected keywords of madry_ns.evaluate.Settings")
    settings = Settings(attacks=tuple(ROW if attacks is None else attacks), modes=modes,
                        sanity=sanity, **budgets)
    if attacks is None:
        columns = table_columns(c, settings.modes)
        settings = dataclasses.replace(settings, attacks=tuple(
            k for k, row in ROW.items() if row.cells(settings, columns)
            and (toolkit_bn or not row.needs_toolkit_bn)))
    check_modes(c, settings.modes)
    _check_model_can_run(model, toolkit_bn, settings, references)

    train = (_on_255(references, scale) if references is not None
             else np.zeros((0,) + x.shape[1:], np.float32))
    num_classes = max(int(y.max()) + 1, 2)
    dataset = data.Dataset(train, np.zeros(len(train), np.int64),
                           _on_255(x, scale), y,
                           [str(i) for i in range(num_classes)],
                           source or f"arrays ({len(y)} images, pixel scale {pixel_scale:g})")
    seen = _PixelScaled(model, pixel_scale, toolkit_bn) if (scale != 1.0 or not toolkit_bn) \
        else model
    say = (lambda *a: None) if out is False else (out or print)
    final = {}

    def hook(partial, arrays):  # run_suite's last call carries the final arrays
        final["arrays"] = arrays
        if on_row is not None:
            on_row(partial, arrays)

    results = run_suite(seen, dataset, c, settings, out=say, previous=previous, on_row=hook)
    if config is None:  # the config's `model` key is a default here, not this model
        results["model"] = getattr(model, "name", None) or type(model).__name__
    if scale != 1.0:  # say how the caller's scale maps to the labels' 0-255 numbers
        results["inputs"] = {"pixel_scale": float(pixel_scale), "epsilon": c.epsilon / scale,
                             "step_size": c.step_size / scale,
                             "note": "the suite's labels and perturbation sizes are on the "
                                     "0-255 scale (the images times 255 / pixel_scale)"}
    return Result(results, final["arrays"])


def _check_model_can_run(model, toolkit_bn: bool, settings: Settings, references) -> None:
    """A ConfigError before any attack: modes and rows this model cannot run."""
    from madry_ns import inference, rna

    if rna.has_rna(model):
        rows = [k for k in settings.attacks if ROW[k].paths is None]
        if rows:
            raise ConfigError(f"attacks {', '.join(rows)}: made for BN+Shaping (its batch "
                              f"split or reference draws); this model has RNA layers and "
                              f"classifies on random paths: leave them out of attacks")

    if not toolkit_bn:
        bad = [m for m in settings.modes if inference.get(m).needs_toolkit_bn]
        if bad:
            raise ConfigError(f"modes {', '.join(bad)}: inference with batch statistics needs "
                              f"the toolkit's BN layers (madry_ns.layers.BatchNorm); this "
                              f"model has none, so only 'population' (its training=False "
                              f"forward) can run")
        rows = [k for k in settings.attacks if ROW[k].needs_toolkit_bn]
        if rows:
            raise ConfigError(f"attacks {', '.join(rows)}: the shaping attack runs through "
                              f"batch statistics (the toolkit's BN layers); this model has "
                              f"none: leave it out of attacks")
    if "shaped" in settings.modes and references is None:
        raise ConfigError("mode 'shaped' needs references: clean training images the shaped "
                          "forward draws its companions from (references=x_train)")
