"""The fragile-features study's folded-BN analysis (Walter, Stutz & Schiele, Eq. 1, Figures 1-2).

    python -m madry_ns.analysis bn models/normal models/adv models/bn_params \
        --labels NORMAL ADV "BN PARAMS" --output results/bn

folds every BN layer of each model into BN(z) = m z + b (the fragile-features paper's
Eq. 1: normalized weight m = gamma / sqrt(var + eps), normalized bias
b = beta - gamma mean / sqrt(var + eps), from the moving statistics) and writes to --output:

* `bn_channels.csv`: one row per (model, layer, channel): gamma, beta, moving mean and
  variance, epsilon, m, b;
* `bn_layers.csv`: one row per (model, layer): mean, std, mean |.|, share of negative m;
  mean and std of b; means of gamma, beta and the moving variance; and the difference of
  the mean of m to the reference model's (the first, or --reference);
* `summary.json`: per model, the average over layers of that difference (the paper reports
  -0.177 from NORMAL to BN PARAMS), in how many layers the mean of m is below the
  reference's, the per-layer means and the checkpoint analysed;
* `mean_m_per_layer.png`: the per-layer mean of m, one line per model (the paper's Figure 2);
* `hist_layer_NN.png`: histograms of gamma, beta, m and b of layer NN (0 = the first BN in
  forward order), the models overlaid (the paper's Figure 1 shows its 8th layer);
* `tensorboard/<label>/`: the same distributions as TensorBoard histograms, tags
  `bn/<layer>/{gamma,beta,moving_mean,moving_variance,m,b}` at the checkpoint's step, and
  `bn_by_layer/m`, `bn_by_layer/b` with the layer index as step (TensorBoard's offset view
  then shows the layers one behind the other).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np

from madry_ns import files

CHANNEL_FIELDS = ("model", "layer_index", "layer", "channel", "gamma", "beta", "moving_mean",
                  "moving_variance", "epsilon", "m", "b")
LAYER_FIELDS = ("model", "layer_index", "layer", "channels", "mean_m", "std_m", "mean_abs_m",
                "negative_m_share", "mean_b", "std_b", "mean_gamma", "mean_beta",
                "mean_moving_variance", "mean_m_minus_reference")
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance", "m", "b")


def bn_layer_name(model, bn) -> str:
    """'block_1_0/bn1': the layer's path inside the model."""
    path = bn.gamma.path  # 'res_net20/block_1_0/bn1/gamma'
    prefix = model.name + "/"
    path = path[len(prefix):] if path.startswith(prefix) else path
    return path.rsplit("/", 1)[0]


def folded_bn(model) -> list[dict]:
    """Every BN layer of `model` in forward order: its name, variables and folded m, b
    (`BatchNorm.folded`), as float64 numpy arrays."""
    layers = []
    for bn in model.bn_layers():
        m, b = bn.folded()
        layers.append({
            "layer": bn_layer_name(model, bn), "epsilon": float(bn.epsilon),
            "gamma": bn.gamma.numpy().astype(np.float64),
            "beta": bn.beta.numpy().astype(np.float64),
            "moving_mean": bn.moving_mean.numpy().astype(np.float64),
            "moving_variance": bn.moving_variance.numpy().astype(np.float64),
            "m": m.numpy().astype(np.float64), "b": b.numpy().astype(np.float64)})
    return layers


def layer_statistics(layer: dict) -> dict:
    """Per-layer summary of one `folded_bn` entry."""
    m, b = layer["m"], layer["b"]
    return {"layer": layer["layer"], "channels": len(m), "mean_m": float(m.mean()),
            "std_m": float(m.std()), "mean_abs_m": float(np.abs(m).mean()),
            "negative_m_share": float((m < 0).mean()), "mean_b": float(b.mean()),
            "std_b": float(b.std()), "mean_gamma": float(layer["gamma"].mean()),
            "mean_beta": float(layer["beta"].mean()),
            "mean_moving_variance": float(layer["moving_variance"].mean())}


def mean_m_difference(reference: list[dict], other: list[dict]) -> float:
    """Average over layers of (mean m of `other` - mean m of `reference`): the paper's
    "average difference between the mean of the normalized weights" (-0.177 from NORMAL to
    BN PARAMS). Both are `folded_bn` lists of the same architecture."""
    if [l["layer"] for l in reference] != [l["layer"] for l in other]:
        raise ValueError("the two models have different BN layers; compare models of one "
                         "architecture")
    return float(np.mean([o["m"].mean() - r["m"].mean() for r, o in zip(reference, other)]))


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "model"


def bn_analysis(models: dict, output_dir: str, reference: str | None = None,
                steps: dict | None = None, sources: dict | None = None) -> dict:
    """Write the folded-BN analysis of `models` (label -> model, in plot order) to
    `output_dir` (files in the module docstring); return the summary.

    `reference` is the label the differences are taken against (default: the first);
    `steps` and `sources` give each label's checkpoint step (TensorBoard) and path.
    """

    labels = list(models)
    reference = reference or labels[0]
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the labels {labels}")
    steps, sources = steps or {}, sources or {}
    folded = {label: folded_bn(model) for label, model in models.items()}
    names = [l["layer"] for l in folded[reference]]
    for label in labels:
        if [l["layer"] for l in folded[label]] != names:
            raise ValueError(f"model {label!r} has other BN layers than {reference!r}; "
                             f"compare models of one architecture")
    os.makedirs(output_dir, exist_ok=True)

    channels, layers = io.StringIO(), io.StringIO()
    channel_rows = csv.DictWriter(channels, CHANNEL_FIELDS, lineterminator="\n")
    layer_rows = csv.DictWriter(layers, LAYER_FIELDS, lineterminator="\n")
    channel_rows.writeheader()
    layer_rows.writeheader()
    for label in labels:
        for i, (layer, ref) in enumerate(zip(folded[label], folded[reference])):
            for c in range(len(layer["m"])):
                channel_rows.writerow({"model": label, "layer_index": i, "layer": layer["layer"],
                                       "channel": c, "epsilon": repr(layer["epsilon"]),
                                       **{k: repr(float(layer[k][c])) for k in BN_VARIABLES}})
            row = layer_statistics(layer)
            row["mean_m_minus_reference"] = row["mean_m"] - float(ref["m"].mean())
            layer_rows.writerow({"model": label, "layer_index": i,
                                 **{k: repr(v) if isinstance(v, float) else v
                                    for k, v in row.items()}})
    files.atomic_write_text(os.path.join(output_dir, "bn_channels.csv"), channels.getvalue())
    files.atomic_write_text(os.path.join(output_dir, "bn_layers.csv"), layers.getvalue())

    summary = {
        "reference": reference, "layers": names,
        "models": {label: {
            "checkpoint": sources.get(label), "step": steps.get(label),
            "mean_m_per_layer": [float(l["m"].mean()) for l in folded[label]],
            "average_mean_m_difference_to_reference": mean_m_difference(folded[reference],
                                                                        folded[label]),
            "layers_with_lower_mean_m_than_reference": int(sum(
                o["m"].mean() < r["m"].mean()
                for r, o in zip(folded[reference], folded[label])))}
            for label in labels},
        "paper": "-0.177 average difference from NORMAL to BN PARAMS (ResNet-20, CIFAR-10)"}
    files.atomic_write_text(os.path.join(output_dir, "summary.json"),
                            json.dumps(summary, indent=2) + "\n")
    _plot_mean_m(folded, names, os.path.join(output_dir, "mean_m_per_layer.png"))
    for i, name in enumerate(names):
        _plot_layer_histograms({label: folded[label][i] for label in labels}, i, name,
                               os.path.join(output_dir, f"hist_layer_{i:02d}.png"))
    _write_histograms(folded, os.path.join(output_dir, "tensorboard"), steps)
    return summary


def _plot_mean_m(folded: dict, names: list, path: str) -> None:
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    for label, layers in folded.items():
        ax.plot(range(len(layers)), [l["m"].mean() for l in layers], marker="o", label=label)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_xlabel("BN layer (forward order)")
    ax.set_ylabel("mean of m = gamma / sqrt(var + eps)")
    ax.set_title("Mean normalized BN weight per layer")
    ax.legend()
    fig.tight_layout()
    files.save_figure(fig, path)


def _plot_layer_histograms(layer_by_label: dict, index: int, name: str, path: str) -> None:
    plt = files.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, key in zip(axes, ("gamma", "beta", "m", "b")):
        values = [layer[key] for layer in layer_by_label.values()]
        edges = np.histogram_bin_edges(np.concatenate(values), bins=30)
        for label, v in zip(layer_by_label, values):
            ax.hist(v, bins=edges, alpha=0.5, label=label)
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"BN layer {index} ({name})")
    fig.tight_layout()
    files.save_figure(fig, path)


def _write_histograms(folded: dict, log_dir: str, steps: dict) -> None:
    import tensorflow as tf

    for label, layers in folded.items():
        writer = tf.summary.create_file_writer(os.path.join(log_dir, _safe_label(label)))
        with writer.as_default():
            for layer in layers:
                for key in BN_VARIABLES:
                    tf.summary.histogram(f"bn/{layer['layer']}/{key}", layer[key],
                                         step=steps.get(label) or 0)
            for i, layer in enumerate(layers):
                tf.summary.histogram("bn_by_layer/m", layer["m"], step=i)
                tf.summary.histogram("bn_by_layer/b", layer["b"], step=i)
        writer.close()


def run_bn(paths: list[str], labels: list[str] | None, output_dir: str,
           reference: str | None = None, out=print) -> dict:
    """`bn` subcommand: load each model (`checkpoints.load_model`) and analyse it."""
    from madry_ns import checkpoints

    labels = labels or [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels gives {len(labels)} names for {len(paths)} models; give "
                         f"one per model")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels must be distinct, got {labels}")
    if reference is not None and reference not in labels:
        raise ValueError(f"--reference {reference!r} is not one of the labels {labels}")
    models, steps, sources = {}, {}, {}
    for label, path in zip(labels, paths):
        prefix = checkpoints.resolve(path)
        models[label] = checkpoints.load_model(prefix)
        steps[label], sources[label] = checkpoints.checkpoint_step(prefix), prefix
    summary = bn_analysis(models, output_dir, reference=reference, steps=steps,
                          sources=sources)
    ref = summary["reference"]
    for label in labels:
        if label != ref:
            d = summary["models"][label]["average_mean_m_difference_to_reference"]
            lower = summary["models"][label]["layers_with_lower_mean_m_than_reference"]
            out(f"average difference of per-layer mean m, {ref} -> {label}: {d:+.4f} (lower "
                f"in {lower} of {len(summary['layers'])} layers)")
    out(f"wrote {output_dir}: bn_layers.csv, bn_channels.csv, summary.json, "
        f"mean_m_per_layer.png, {len(summary['layers'])} hist_layer_NN.png, tensorboard/")
    return summary
