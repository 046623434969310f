"""Speed, measured against the machine in the same run: `python -m madry_ns.benchmark`.

Every timing is a median over repetitions after warm-up (compilation excluded), with the
spread (min, max). Work is counted analytically: TensorFlow's op-level FLOP count of one
forward pass (convolutions and matmuls dominate), with a backward pass counted as two
forwards. So a training step is 3 forwards, a PGD-k attack 3k, TRADES adds a clean forward
and a second update pass. Each rate is also given as a fraction of the machine's fp32 peak
as measured by the same command (a 4096^2 matmul), so numbers from a busy or a different
machine stay comparable. Nothing here asserts a time: targets are reported, met or not.

    python -m madry_ns.benchmark --json benchmarks/results/<machine>.json
    python -m madry_ns.benchmark --quick           # a smoke run (tiny, seconds)
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

PGD = dict(epsilon=8.0, num_steps=10, step_size=2.0)
# Forward-pass equivalents per image of one training step (backward = 2 forwards).
STEP_FORWARDS = {"natural": 3, "madry": 3 * PGD["num_steps"] + 3,
                 "shaping": 3 * PGD["num_steps"] + 3,
                 # TRADES: attack 3k, clean target forward 1, update on clean + adversarial 6.
                 "trades": 3 * PGD["num_steps"] + 1 + 6}
TARGETS = {
    "train_step_peak_fraction": 0.60,    # ResNet-20 PGD-10 step, batch 64
    "shaping_vs_madry_slowdown": 1.05,   # shaping step time / Madry step time
    "eval_pgd_speedup_vs_cleverhans": 3.0,
    "shaped_inference_vs_flop_bound": 1.10,
    "pipeline_vs_training_consumption": 10.0,
}


def _timeit(fn, reps: int, warmup: int = 1) -> dict:
    """Median, min and max over `reps` calls after `warmup` calls; `first_s` is the first
    call's time (tracing and graph optimization included), so the one-time cost shows."""
    times = []
    for _ in range(warmup + reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
            "reps": reps, "warmup": warmup, "first_s": times[0]}


def forward_flops(model) -> float:
    """FLOPs of one image's forward pass (population BN), from TensorFlow's op counts."""
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert
    def forward(x):
        return model(x, bn_mode="population")

    graph = tf.function(forward).get_concrete_function(
        tf.TensorSpec([1, 32, 32, 3], tf.float32)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def measure_peak(reps: int, n: int = 4096) -> dict:
    """fp32 matmul throughput, the machine's practical peak for this run."""
    import tensorflow as tf

    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    timing = _timeit(lambda: matmul().numpy(), reps)
    return {**timing, "gflops": 2 * n ** 3 / timing["median_s"] / 1e9, "size": n}


def measure_conv(reps: int, channels: int = 640, size: int = 8, batch: int = 64) -> dict:
    """fp32 throughput of one 3x3 convolution (default: WRN-34-10's widest layer at batch
    64). On an unthrottled host it comes close to the matmul peak; on 2026-11-30's throttled
    host it ran nearly 2x the matmul, so the report shows both rather than trust one roof."""
    import tensorflow as tf

    x = tf.random.normal([batch, size, size, channels])
    w = tf.random.normal([3, 3, channels, channels])
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
    timing = _timeit(lambda: conv().numpy(), reps)
    flops = 2 * batch * size * size * channels * channels * 9
    return {**timing, "gflops": flops / timing["median_s"] / 1e9,
            "shape": [batch, size, size, channels]}


def _config(model: str, width: int, batch: int, method: str):
    from madry_ns import config as config_lib

    return config_lib.from_dict({
        "model": model, "model_width": width, "training_batch_size": batch,
        "training_method": "trades" if method == "trades" else
        ("natural" if method == "natural" else "madry"),
        "shaping_ratio": 3 if method == "shaping" else 0, **PGD})


def measure_train_step(model_name: str, width: int, batch: int, method: str, reps: int,
                       peak_gflops: float, warmup: int = 1) -> dict:
    import tensorflow as tf

    from madry_ns import training
    from madry_ns.models import build_model

    config = _config(model_name, width, batch, method)
    tf.keras.utils.set_random_seed(0)
    model = build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = training.make_train_step(model, optimizer, config)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int64))
    counter = iter(range(10 ** 9))
    timing = _timeit(lambda: float(step(x, y, tf.constant(next(counter), tf.int64))
                                   ["total_loss"]), reps, warmup)
    flops = forward_flops(model) * STEP_FORWARDS[method] * batch
    gflops = flops / timing["median_s"] / 1e9
    return {"name": f"train {method} {model_name} w{width} b{batch}", "kind": "train_step",
            "model": model_name, "width": width, "batch": batch, "method": method, **timing,
            "images_per_s": batch / timing["median_s"], "gflop_per_step": flops / 1e9,
            "gflops": gflops, "peak_fraction": gflops / peak_gflops}


def measure_eval_pgd(reps: int, peak_gflops: float, batch: int = 100) -> list[dict]:
    """Our compiled PGD vs CleverHans' projected_gradient_descent called eagerly, on the same
    model and inputs, without random start (the examples must be identical). CleverHans is
    timed twice: with one reused model_fn (its best case: its per-step gradient function is
    traced once) and with a new lambda per call, as its tutorials write it (each call
    retraces)."""
    import tensorflow as tf
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    from madry_ns import attacks
    from madry_ns.models import ResNet20

    tf.keras.utils.set_random_seed(0)
    model = ResNet20(1).build_for_input()
    rng = np.random.default_rng(1)
    x = tf.constant(rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int64))
    logits_fn = lambda z: model(z, bn_mode="population")  # noqa: E731  one object: one trace

    ours_fn = tf.function(lambda x, y: attacks.pgd_attack(model, x, y, random_start=False,
                                                          **PGD))

    def cleverhans(fn=logits_fn):
        return projected_gradient_descent(
            fn, x, PGD["epsilon"], PGD["step_size"], PGD["num_steps"], np.inf,
            clip_min=0.0, clip_max=255.0, y=y, rand_init=False, sanity_checks=False)

    ours_t = _timeit(lambda: ours_fn(x, y).numpy(), reps)
    ch_t = _timeit(lambda: cleverhans().numpy(), reps)
    ch_lambda_t = _timeit(lambda: cleverhans(lambda z: model(z, bn_mode="population"))
                          .numpy(), reps)
    a, b = ours_fn(x, y).numpy(), cleverhans().numpy()
    flops = forward_flops(model) * 3 * PGD["num_steps"] * batch
    rows = []
    for name, t in [("eval PGD-10 ours", ours_t), ("eval PGD-10 CleverHans", ch_t),
                    ("eval PGD-10 CleverHans, new lambda per call", ch_lambda_t)]:
        gflops = flops / t["median_s"] / 1e9
        rows.append({"name": name, "kind": "eval_pgd", "batch": batch, **t,
                     "images_per_s": batch / t["median_s"], "gflops": gflops,
                     "peak_fraction": gflops / peak_gflops})
    rows[0]["identical_to_cleverhans"] = bool(np.array_equal(a, b))
    rows[0]["fraction_of_pixels_equal"] = float(np.mean(a == b))
    rows[0]["speedup_vs_cleverhans"] = ch_t["median_s"] / ours_t["median_s"]
    rows[0]["speedup_vs_cleverhans_new_lambda"] = ch_lambda_t["median_s"] / ours_t["median_s"]
    return rows


def measure_shaped_inference(ratio: int, reps: int, peak_gflops: float,
                             model_name: str = "madry_wrn", width: int = 1,
                             batch: int = 100, test_images: int = 100) -> dict:
    """BN+Shaping on `test_images` images vs plain forwards of the same (1 + r) x images."""
    import tensorflow as tf

    from madry_ns import shaping
    from madry_ns.models import MadryWRN, ResNet20

    tf.keras.utils.set_random_seed(0)
    model = (MadryWRN if model_name == "madry_wrn" else ResNet20)(width).build_for_input()
    rng = np.random.default_rng(2)
    pool = shaping.ReferencePool(rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8))
    x = tf.constant(rng.uniform(0, 255, (test_images, 32, 32, 3)).astype(np.float32))
    shaped = shaping.ShapedInference(model, pool, ratio, batch // (ratio + 1))
    shaped_fn = tf.function(shaped.logits)
    seed = tf.constant([0, 0], tf.int64)
    plain_x = tf.constant(rng.uniform(0, 255, ((ratio + 1) * test_images, 32, 32, 3))
                          .astype(np.float32))
    plain_fn = tf.function(lambda z: model(z, bn_mode="batch_frozen"))
    chunks = [plain_x[i:i + batch] for i in range(0, len(plain_x), batch)]
    shaped_t = _timeit(lambda: shaped_fn(x, seed).numpy(), reps)
    plain_t = _timeit(lambda: [plain_fn(c).numpy() for c in chunks], reps)
    flops = forward_flops(model) * (ratio + 1) * test_images
    gflops = flops / shaped_t["median_s"] / 1e9
    return {"name": f"shaped inference 1:{ratio} {model_name} w{width}", "kind": "shaped",
            "ratio": ratio, "test_images": test_images, **shaped_t,
            "images_per_s": test_images / shaped_t["median_s"], "gflops": gflops,
            "peak_fraction": gflops / peak_gflops,
            "plain_forward_same_flops_s": plain_t["median_s"],
            "vs_flop_bound": shaped_t["median_s"] / plain_t["median_s"]}


def measure_pipeline(batch: int, steps: int, reps: int) -> dict:
    """The training input pipeline alone on CIFAR-sized data (50,000 images)."""
    from madry_ns import data

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 50000).astype(np.int64)
    pipeline = data.train_pipeline(images, labels, batch, order_seed=0, augment_seed=0)
    iterator = iter(pipeline)

    def drain():
        for _ in range(steps):
            next(iterator)[1].numpy()

    timing = _timeit(drain, reps)
    return {"name": f"input pipeline b{batch}", "kind": "pipeline", "batch": batch, **timing,
            "images_per_s": batch * steps / timing["median_s"]}


def environment() -> dict:
    import keras
    import tensorflow as tf

    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__,
            "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                        **{k: os.environ[k] for k in ("OMP_NUM_THREADS",
                                                      "TF_ENABLE_ONEDNN_OPTS")
                           if k in os.environ}},
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def targets(rows: list[dict], roof: float | None = None) -> list[dict]:
    """Each target: the measured value, the goal, met or not; `roof` is the faster of the
    matmul peak and the wide convolution, against which the step is also judged."""
    by = {r["name"]: r for r in rows}
    out = []

    def add(name, value, goal, higher_is_better, note):
        if value is None:
            return
        met = value >= goal if higher_is_better else value <= goal
        out.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    r20 = by.get("train madry resnet20 w1 b64")
    add("train_step_peak_fraction", r20 and r20["peak_fraction"],
        TARGETS["train_step_peak_fraction"], True, "ResNet-20 PGD-10 step, batch 64")
    if roof:
        add("train_step_fraction_of_fastest_kernel", r20 and r20["gflops"] / roof,
            TARGETS["train_step_peak_fraction"], True,
            "the same step against the faster of the matmul and the wide convolution")
    shp = by.get("train shaping resnet20 w1 b64")
    add("shaping_vs_madry_slowdown", shp and r20 and shp["median_s"] / r20["median_s"],
        TARGETS["shaping_vs_madry_slowdown"], False, "ResNet-20, batch 64")
    ours = by.get("eval PGD-10 ours")
    same = ("identical examples" if ours and ours["identical_to_cleverhans"] else
            "EXAMPLES DIFFER")
    add("eval_pgd_speedup_vs_cleverhans", ours and ours["speedup_vs_cleverhans"],
        TARGETS["eval_pgd_speedup_vs_cleverhans"], True, f"CleverHans' best case; {same}")
    add("eval_pgd_speedup_vs_cleverhans_new_lambda",
        ours and ours["speedup_vs_cleverhans_new_lambda"],
        TARGETS["eval_pgd_speedup_vs_cleverhans"], True,
        f"CleverHans as its tutorials call it; {same}")
    for r in rows:
        if r["kind"] == "shaped":
            add(f"shaped_inference_1:{r['ratio']}_vs_flop_bound", r["vs_flop_bound"],
                TARGETS["shaped_inference_vs_flop_bound"], False,
                "time / time of plain forwards of the same (1+r)x images")
    pipe = next((r for r in rows if r["kind"] == "pipeline"), None)
    train = [r for r in rows if r["kind"] == "train_step" and r["method"] == "madry"]
    if pipe and train:
        fastest = max(r["images_per_s"] for r in train)
        add("pipeline_vs_training_consumption", pipe["images_per_s"] / fastest,
            TARGETS["pipeline_vs_training_consumption"], True,
            "pipeline images/s over the fastest PGD-10 training step's images/s")
    return out


def run(quick: bool = False, reps: int = 5, wide: bool = True, only_wrn: bool = False,
        progress=print) -> dict:
    """Every measurement; `quick` shrinks it to a smoke run; `only_wrn` measures Madry's WRN
    alone (width 1 and 10, batch 64), to add the wide rows to a `wide=False` record."""
    reps = 1 if quick else reps
    peak = measure_peak(reps, n=1024 if quick else 4096)
    progress(f"peak: {peak['gflops']:.0f} GFLOP/s (fp32 matmul {peak['size']}^2)")
    conv = measure_conv(reps, channels=64 if quick else 640)
    progress(f"wide 3x3 convolution {conv['shape']}: {conv['gflops']:.0f} GFLOP/s")
    rows = []
    models = ([] if only_wrn else [("resnet20", 1)]) + [("madry_wrn", 1)] + (
        [("madry_wrn", 10)] if (wide or only_wrn) and not quick else [])
    batches = [64] if quick or only_wrn else [64, 128]
    methods = ["natural", "madry"] if quick else ["natural", "madry", "shaping", "trades"]
    for model_name, width in models:
        for batch in batches:
            if width == 10 and batch == 128:
                continue  # minutes per step on a CPU; batch 64 carries the comparison
            for method in methods:
                # WRN-34-10: one timed step and no separate warm-up, since a step takes
                # minutes; its first call includes tracing, whose size the width-1 rows'
                # first_s - median_s shows (the same graph, narrower).
                r = measure_train_step(model_name, width, batch, method,
                                       1 if width == 10 else reps, peak["gflops"],
                                       warmup=0 if width == 10 else 1)
                rows.append(r)
                progress(_row_text(r))
    if not only_wrn:
        _measure_the_rest(rows, quick, reps, peak, progress)
    # A shared host's speed drifts: the peak again at the end shows how far (the fractions
    # above use the first measurement).
    peak_end = measure_peak(reps, n=peak["size"])
    progress(f"peak at the end: {peak_end['gflops']:.0f} GFLOP/s")
    return {"environment": environment(), "peak": peak, "peak_end": peak_end, "conv": conv,
            "results": rows, "targets": targets(rows, max(peak["gflops"], conv["gflops"]))}


def _measure_the_rest(rows: list, quick: bool, reps: int, peak: dict, progress) -> None:
    """Evaluation PGD against CleverHans, shaped inference and the input pipeline."""
    for r in measure_eval_pgd(reps, peak["gflops"], batch=20 if quick else 100):
        rows.append(r)
        progress(_row_text(r))
    for ratio in ([3] if quick else [3, 9]):
        r = measure_shaped_inference(ratio, reps, peak["gflops"],
                                     test_images=20 if quick else 100,
                                     batch=20 if quick else 100)
        rows.append(r)
        progress(_row_text(r))
    r = measure_pipeline(128, 5 if quick else 50, reps)
    rows.append(r)
    progress(_row_text(r))


def _row_text(r: dict) -> str:
    extra = f"{r['gflops']:7.1f} GFLOP/s {100 * r['peak_fraction']:5.1f}% of peak" \
        if "gflops" in r else ""
    return (f"{r['name']:<40} {r['median_s']:8.3f} s  [{r['min_s']:.3f}, {r['max_s']:.3f}]  "
            f"{r['images_per_s']:9.1f} img/s  {extra}")


def table(report: dict) -> str:
    """The report as Markdown."""
    lines = [f"Machine: {report['environment']['cpu']}, {report['environment']['cores']} cores; "
             f"TensorFlow {report['environment']['tensorflow']}; "
             f"{report['environment']['date']}.",
             f"Measured fp32 peak (matmul {report['peak']['size']}^2): "
             f"{report['peak']['gflops']:.0f} GFLOP/s at the start, "
             f"{report['peak_end']['gflops']:.0f} at the end (fractions use the start)."]
    if "conv" in report:
        lines.append(f"A 3x3 convolution of shape {report['conv']['shape']}: "
                     f"{report['conv']['gflops']:.0f} GFLOP/s (where it beats the matmul, "
                     f"the fractions of peak overstate).")
    lines += ["", "| measurement | median s | min-max s | images/s | GFLOP/s | % of peak |",
              "|---|---|---|---|---|---|"]
    for r in report["results"]:
        gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
        pf = f"{100 * r['peak_fraction']:.1f}" if "peak_fraction" in r else ""
        name = r["name"] + (" (one step, tracing included)" if r.get("warmup") == 0 else "")
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} "
                     f"| {r['images_per_s']:.1f} | {gf} | {pf} |")
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} ({t['note']}) | {t['value']:.3g} | {t['goal']:g} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from madry_ns import cli

    parser = cli.Parser("python -m madry_ns.benchmark", __doc__, _main, config=False,
                        tensorflow=True, check=_check)
    parser.add_argument("--json", help="write the full report here (atomically)")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--no_wide", action="store_true",
                        help="skip Madry's WRN-34-10 (about a minute per step on a CPU)")
    parser.add_argument("--only_wrn", action="store_true",
                        help="only Madry's WRN at width 1 and 10, batch 64 (the wide rows a "
                             "--no_wide record lacks)")
    parser.add_argument("--roofs", action="store_true",
                        help="only the two roofs (matmul, wide convolution): seconds; shows "
                             "whether the host runs at its usual speed")
    return cli.run(parser, argv)


def _check(args) -> None:
    from madry_ns.errors import UsageError

    if args.only_wrn and (args.no_wide or args.quick):
        raise UsageError("--only_wrn measures the wide WRN: it excludes --no_wide and --quick")


def _main(args) -> int:
    from madry_ns import files

    if args.roofs:
        peak, conv = measure_peak(args.reps), measure_conv(args.reps)
        print(f"fp32 matmul 4096^2: {peak['gflops']:.0f} GFLOP/s; 3x3 convolution "
              f"{conv['shape']}: {conv['gflops']:.0f} GFLOP/s (medians of {args.reps})")
        return 0
    report = run(quick=args.quick, reps=args.reps, wide=not args.no_wide,
                 only_wrn=args.only_wrn)
    text = table(report)
    print(text)
    if args.json:
        files.atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        files.atomic_write_text(args.markdown, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
