"""AutoAttack's survivors protocol against the fixed-batch one, on the same per-image model
and images, in one process with the variants interleaved (as `benchmarks/ab.py`):

    python benchmarks/autoattack_protocols.py            # writes benchmarks/results/
    python benchmarks/autoattack_protocols.py --quick    # a smoke run (reduced budget)

The model is a small convnet (conv 16 3x3, dense 32) trained in seconds on scikit-learn's
8x8 digits (0-255 scale, population forward: per image); the images are 64 held-out digits,
epsilon 32. Variants: AutoAttack `standard` (its full budget) under survivors and under fixed
batches, and the suite's earlier fixed-batch ensemble (`legacy`: APGD-CE + APGD-T + Square at
the same budget) for reference; and, in batches of 16, survivors taken within each batch
against re-batched over all 64 (`auto_attack_survivors`, the official code's way). Both
protocols, and the re-batched survivors, must give the one-batch verdict image by image (the
run stops otherwise); the results are the time ratios. Times are medians after one warm-up call
(tracing excluded; its time is reported as `first_s`); nothing asserts a time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _model_and_images(n: int):
    import keras
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:n], order[300:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[train], d.target[train], epochs=20, batch_size=64, verbose=0)
    return model, images[test], d.target[test].astype(np.int64)


def run(quick: bool = False, reps: int = 7, n: int = 64, epsilon: float = 32.0) -> dict:
    import tensorflow as tf

    from madry_ns import attacks

    model, x, y = _model_and_images(n)

    def logits_fn(z, draw=None):
        return model(z, training=False)

    params = attacks.version_params("standard")
    if quick:
        params = attacks.AutoAttackParams(apgd_steps=10, apgd_targets=2, fab_steps=10,
                                          fab_targets=2, square_queries=100)
    seed = tf.constant([0, 1], tf.int64)
    variants = {
        "survivors": tf.function(lambda a, b: attacks.auto_attack(
            logits_fn, a, b, epsilon=epsilon, params=params, survivors=True, seed=seed)),
        "fixed_batch": tf.function(lambda a, b: attacks.auto_attack(
            logits_fn, a, b, epsilon=epsilon, params=params, survivors=False, seed=seed)),
        "legacy_fixed_batch": tf.function(lambda a, b: attacks.autoattack_style(
            logits_fn, a, b, epsilon=epsilon, num_steps=params.apgd_steps,
            num_targets=params.apgd_targets, square_num_steps=params.square_queries,
            seed=seed)),
    }
    # A test set bigger than one batch: the survivors taken within each batch of 16 (as
    # `auto_attack` is called batch by batch) against re-batched over the whole set
    # (`auto_attack_survivors`, the official run_standard_evaluation).
    per_batch = tf.function(lambda a, b: attacks.auto_attack(
        logits_fn, a, b, epsilon=epsilon, params=params, survivors=True, seed=seed))
    variants["survivors_per_batch_16"] = lambda a, b: {"robust": tf.concat(
        [per_batch(a[i:i + 16], b[i:i + 16])["robust"] for i in range(0, n, 16)], 0)}
    rebatched = attacks.survivors_runner(logits_fn, epsilon=epsilon, batch_size=16,
                                         params=params)
    variants["survivors_rebatched_16"] = lambda a, b: {"robust": tf.constant(
        rebatched(a.numpy(), b.numpy(), seed)["robust"])}
    xt, yt = tf.constant(x), tf.constant(y)
    times = {k: [] for k in variants}
    first, robust = {}, {}
    for name, fn in variants.items():  # warm-up: tracing and graph optimization
        start = time.perf_counter()
        robust[name] = fn(xt, yt)["robust"].numpy()
        first[name] = time.perf_counter() - start
    for _ in range(reps):  # interleaved, so a busy machine slows all alike
        for name, fn in variants.items():
            start = time.perf_counter()
            out = fn(xt, yt)["robust"].numpy()
            times[name].append(time.perf_counter() - start)
            if not np.array_equal(out, robust[name]):
                raise SystemExit(f"{name}: a second run gave other verdicts")
    if not np.array_equal(robust["survivors"], robust["survivors_rebatched_16"]):
        raise SystemExit("re-batched survivors and one batch of survivors disagree")
    if not np.array_equal(robust["survivors"], robust["fixed_batch"]):
        raise SystemExit("survivors and fixed batches disagree image by image: "
                         f"{robust['survivors'].astype(int)} vs "
                         f"{robust['fixed_batch'].astype(int)}")
    clean = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "first_s": first[name], "robust_accuracy": float(robust[name].mean())}
            for name, t in times.items()}
    return {
        "what": "AutoAttack standard: survivors vs fixed-batch protocol, same model/images",
        "model": "digits convnet (conv16 3x3 + dense32), population forward",
        "images": n, "epsilon": epsilon, "params": dict(vars(params)), "quick": quick,
        "reps": reps, "clean_accuracy": clean, "rows": rows,
        "fixed_over_survivors": rows["fixed_batch"]["median_s"]
        / rows["survivors"]["median_s"],
        "legacy_over_survivors": rows["legacy_fixed_batch"]["median_s"]
        / rows["survivors"]["median_s"],
        "per_batch_over_rebatched": rows["survivors_per_batch_16"]["median_s"]
        / rows["survivors_rebatched_16"]["median_s"],
        # The fastest repetitions, least disturbed by other jobs on a shared machine.
        "fixed_over_survivors_min": rows["fixed_batch"]["min_s"] / rows["survivors"]["min_s"],
        "same_verdicts_image_by_image": True,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0], "tensorflow": tf.__version__,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/autoattack_protocols.py" + (" --quick" if quick else ""),
    }


def markdown(r: dict) -> str:
    lines = [f"# {r['what']}", "",
             f"{r['model']}; {r['images']} held-out digits, epsilon {r['epsilon']:g} (0-255); "
             f"clean accuracy {100 * r['clean_accuracy']:.1f}%. Machine: {r['machine']}, "
             f"load average {r['load_average']:.1f} at the end; TensorFlow "
             f"{r['tensorflow']}; {r['time']}. Command: `{r['command']}`.", "",
             "| variant | median s | min-max s | first call s | robust accuracy |",
             "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-"
                     f"{row['max_s']:.2f} | {row['first_s']:.1f} | "
                     f"{100 * row['robust_accuracy']:.1f}% |")
    lines += ["", f"Fixed batch / survivors: **{r['fixed_over_survivors']:.2f}x** of the "
                  f"medians, {r['fixed_over_survivors_min']:.2f}x of the fastest of "
                  f"{r['reps']} repetitions (the same verdict on every image); the legacy "
                  f"ensemble (no FAB-T, fixed batch) / survivors: "
                  f"{r['legacy_over_survivors']:.2f}x. In batches of 16, survivors taken "
                  f"per batch / re-batched over all {r['images']} images: "
                  f"**{r['per_batch_over_rebatched']:.2f}x** (re-batched gives the one-batch "
                  f"verdicts on every image; per batch, other random draws).", ""]
    return "\n".join(lines)


def main(argv) -> int:
    quick = "--quick" in argv
    result = run(quick=quick)
    text = markdown(result)
    print(text)
    if not quick:
        from madry_ns import files

        base = os.path.join(HERE, "results", "autoattack-protocols")
        files.atomic_write_text(base + ".json", json.dumps(result, indent=2) + "\n")
        files.atomic_write_text(base + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
