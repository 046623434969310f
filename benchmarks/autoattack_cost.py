"""What the standard AutoAttack costs on a trained toolkit model, attack by attack:

    python benchmarks/autoattack_cost.py --config CONFIG [--checkpoint PATH] [--images 100]

runs AutoAttack `standard` at its full budget (APGD-CE 100 steps; APGD-T 9 targets x 100;
FAB-T 9 targets x 100; Square 5,000 queries) on the first `--images` test images under the
population forward, on survivors (each attack only on the images every earlier one failed on:
the official protocol, and what `python -m madry_ns.evaluate --attacks autoattack --autoattack
standard --modes population` runs). Each attack's time, and the number of images it ran on, are
recorded, and so is the time of one reference pass measured in the same process: the forward
and input gradient of one batch of the same images (the unit a PGD step costs). A shared
machine slows both alike, so "reference passes per attacked image" carries to other loads
better than seconds do; the seconds are for this machine at the recorded load.

Writes benchmarks/results/autoattack-cost.{md,json}. Nothing asserts a time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def run(config, checkpoint: str | None, images: int, command: str, quick: bool = False,
        config_path: str = "") -> dict:
    import tensorflow as tf

    from madry_ns import attacks, data, inference
    from madry_ns.evaluate.suite import load_checkpoint

    path, model = load_checkpoint(config, checkpoint)
    dataset = data.load_dataset(config)
    x = dataset.test_images[:images].astype(np.float32)
    y = dataset.test_labels[:images].astype(np.int64)
    forward = inference.forward(model, config, dataset, "population")
    seed = tf.constant([0, 0], tf.int64)

    def logits_fn(z, draw=None):
        return forward(z, seed)

    @tf.function
    def reference(z, labels):  # one forward + input gradient, as a PGD step
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, logits_fn(z)))
        return tape.gradient(loss, z)

    full = attacks.version_params("standard")
    if quick:  # a smoke run of the script itself, not a measurement
        full = attacks.AutoAttackParams(**{**vars(full), "apgd_steps": 5, "apgd_targets": 2,
                                           "fab_steps": 5, "fab_targets": 2,
                                           "square_queries": 20})
    xt, yt = tf.constant(x), tf.constant(y)
    reference(xt, yt)  # tracing
    ref_times = []
    for _ in range(5):
        start = time.perf_counter()
        reference(xt, yt).numpy()
        ref_times.append(time.perf_counter() - start)
    ref = float(np.median(ref_times))
    clean = np.argmax(logits_fn(xt).numpy(), 1) == y
    robust = clean.copy()
    rows = []
    spec = (tf.TensorSpec([None, *x.shape[1:]], tf.float32), tf.TensorSpec([None], tf.int64))
    for name in full.attacks:
        idx = np.flatnonzero(robust)
        params = attacks.AutoAttackParams(**{**vars(full), "attacks": (name,)})
        fn = tf.function(lambda a, b, p=params: attacks.auto_attack(
            logits_fn, a, b, epsilon=config.epsilon, params=p, survivors=True, seed=seed),
            input_signature=spec)
        start = time.perf_counter()  # tracing, on one image: not part of the attack's cost
        fn(xt[:1], yt[:1])["robust"].numpy()
        warm = time.perf_counter() - start
        start = time.perf_counter()
        ok = fn(tf.constant(x[idx]), tf.constant(y[idx]))["robust"].numpy() if len(idx) else []
        seconds = time.perf_counter() - start
        robust[idx] = ok
        rows.append({"attack": name, "images": int(len(idx)), "seconds": seconds,
                     "first_call_on_one_image_s": warm, "robust_after": float(robust.mean()),
                     "reference_passes": seconds / ref})
        print(f"{name}: {len(idx)} images, {seconds:.1f} s, robust {100 * robust.mean():.1f}%",
              flush=True)
    total = sum(r["seconds"] for r in rows)
    return {
        "what": "AutoAttack standard (full budget) on survivors, population forward",
        "config": config_path, "checkpoint": path, "model": config.model,
        "model_width": config.model_width, "dataset": dataset.source,
        "image_shape": list(x.shape[1:]), "images": images, "epsilon": config.epsilon,
        "params": {k: v for k, v in vars(full).items()},
        "clean_accuracy": float(clean.mean()), "robust_accuracy": float(robust.mean()),
        "reference_pass_s": ref, "rows": rows, "total_s": total,
        "seconds_per_image": total / images,
        "reference_passes_per_image": total / ref,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0], "tensorflow": tf.__version__,
        "time": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
        "quick": quick,
        "note": "each attack is traced (and run) on one image first; its seconds exclude that",
    }


def markdown(r: dict) -> str:
    shape = "x".join(map(str, r["image_shape"]))
    lines = [f"# {r['what']}", "",
             f"{r['model']} width {r['model_width']} ({r['checkpoint']}), the first "
             f"{r['images']} test images of {r['dataset']} ({shape}), epsilon "
             f"{r['epsilon']:g} of 255; clean {100 * r['clean_accuracy']:.1f}%, robust "
             f"{100 * r['robust_accuracy']:.1f}%. Machine: {r['machine']}, load average "
             f"{r['load_average']:.1f} at the end; TensorFlow {r['tensorflow']}; {r['time']}. "
             f"Command: `{r['command']}`.", "",
             f"Reference pass (forward + input gradient of all {r['images']} images, the cost "
             f"of one PGD step): {r['reference_pass_s']:.3f} s.", "",
             "| attack | images attacked | seconds | robust after | in reference passes | "
             "first call on one image (tracing), s |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['attack']} | {row['images']} | {row['seconds']:.1f} | "
                     f"{100 * row['robust_after']:.1f}% | {row['reference_passes']:.0f} | "
                     f"{row['first_call_on_one_image_s']:.1f} |")
    lines += ["", f"In all **{r['total_s']:.0f} s** ({r['seconds_per_image']:.2f} s per image), "
                  f"as long as {r['reference_passes_per_image']:.0f} reference passes (a PGD-20 "
                  f"evaluation of the same images is 20), tracing excluded. Each attack runs "
                  f"only on the images every earlier one failed on, so the cost per image "
                  f"grows with the model's robustness.", ""]
    return "\n".join(lines)


def main(argv) -> int:
    import argparse

    from madry_ns import config as config_lib
    from madry_ns import files

    parser = argparse.ArgumentParser(prog="python benchmarks/autoattack_cost.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run with a tiny budget; writes nothing")
    args = parser.parse_args(argv)
    config = config_lib.load(args.config)
    command = "python benchmarks/autoattack_cost.py " + " ".join(argv)
    result = run(config, args.checkpoint, args.images, command, args.quick, args.config)
    text = markdown(result)
    print(text)
    if args.quick:
        return 0
    base = os.path.join(HERE, "results", "autoattack-cost")
    files.atomic_write_text(base + ".json", json.dumps(result, indent=2) + "\n")
    files.atomic_write_text(base + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
