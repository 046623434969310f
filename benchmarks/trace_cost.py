"""What tracing a training step costs with AutoGraph and without (`madry_ns.graph`):

    python benchmarks/trace_cost.py [--reps 3]

For each model and training method below, a fresh Python process builds the model (seeded)
and the training step and times two things: tracing the step's attack-and-gradient function
(`TrainStep._compute`, `get_concrete_function`) and its first call (graph optimization and
kernel set-up). A fresh process each time, because AutoGraph caches what it has converted:
only the first trace of a code path in a process pays for the rewrite, which is what a
train.py run, an evaluation, or each script a test starts pays. Each measurement is made
compiled as the toolkit compiles it (`graph.function_for`: AutoGraph off for its own models)
and with `tf.function` (AutoGraph on), alternating, `--reps` times; the table gives medians and
the ratio off / on, measured in the same run, so a loaded machine slows both alike. The
target: the trace's ratio at most 0.75.

Writes benchmarks/results/trace-cost.{md,json}. Nothing asserts a time.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (model, width, config overrides): the narrow WRN with Madry's PGD, shaping and TRADES, and
# ResNet-20 with PGD; digits-sized inputs (32x32x3), batch 8, PGD-2.
CASES = [("madry_wrn", 1, {}), ("madry_wrn", 1, {"shaping_ratio": 3}),
         ("madry_wrn", 1, {"training_method": "trades"}), ("resnet20", 1, {})]
TARGET_RATIO = 0.75


def _config(model: str, width: int, overrides: dict):
    from madry_ns import config as config_lib

    # Nothing is written: building the model and tracing its step touch no model_dir.
    values = {"model_dir": os.path.join(tempfile.gettempdir(), "trace_cost"), "dataset": "digits",
              "model": model, "model_width": width, "training_batch_size": 8,
              "num_steps": 2, "step_size": 4.0, "epsilon": 8.0, **overrides}
    return config_lib.from_dict(values, source="benchmarks/trace_cost.py")


def measure(config, autograph: bool) -> dict:
    """Seconds to trace the step's compute function and to run it once, in a fresh model."""
    import keras
    import tensorflow as tf

    from madry_ns import data, training
    from madry_ns.graph import function_for
    from madry_ns.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(config)
    optimizer = training.make_optimizer(config)
    optimizer.build(model.trainable_variables)
    original = training.function_for
    training.function_for = (lambda m: tf.function) if autograph else function_for
    try:
        step = training.make_train_step(model, optimizer, config)
    finally:
        training.function_for = original
    x = tf.random.stateless_uniform([config.training_batch_size, *data.image_shape(config)],
                                    (1, 2), maxval=255.0)
    y = tf.zeros([config.training_batch_size], tf.int64)
    s = tf.constant(0, tf.int64)
    start = time.perf_counter()
    step._compute.get_concrete_function(x, y, s)
    traced = time.perf_counter()
    step._compute(x, y, s)[1]["total_loss"].numpy()
    return {"trace_s": traced - start, "first_call_s": time.perf_counter() - traced}


def _in_a_fresh_process(case, autograph: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure",
                           json.dumps({"case": case, "autograph": autograph})],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(reps: int, command: str, cases=CASES) -> dict:
    import tensorflow as tf

    rows = []
    for case in cases:
        model, width, overrides = case
        found = {True: [], False: []}
        for _ in range(reps):
            for autograph in (False, True):
                found[autograph].append(_in_a_fresh_process(case, autograph))
        med = {a: {k: float(np.median([m[k] for m in found[a]])) for k in found[a][0]}
               for a in found}
        row = {"model": model, "width": width, "settings": overrides,
               "autograph_off": med[False], "autograph_on": med[True],
               "trace_ratio": med[False]["trace_s"] / med[True]["trace_s"],
               "all": {"off": found[False], "on": found[True]}}
        row["meets_target"] = row["trace_ratio"] <= TARGET_RATIO
        rows.append(row)
        print(f"{model} w{width} {overrides or ''}: trace {med[True]['trace_s']:.2f} s -> "
              f"{med[False]['trace_s']:.2f} s ({row['trace_ratio']:.2f}x)", flush=True)
    return {"what": "training-step trace time, AutoGraph off (graph.function_for) vs on",
            "reps": reps, "target_trace_ratio": TARGET_RATIO, "rows": rows,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": os.getloadavg()[0], "tensorflow": tf.__version__,
            "time": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}


def markdown(r: dict) -> str:
    lines = [f"# {r['what']}", "",
             f"Medians of {r['reps']} alternating measurements per row, each in a fresh Python "
             f"process (digits-sized 32x32x3 inputs, batch 8, PGD-2). Machine: {r['machine']}, "
             f"load average {r['load_average']:.1f} at the end; TensorFlow {r['tensorflow']}; "
             f"{r['time']}. Command: `{r['command']}`.", "",
             "| model | settings | trace, AutoGraph on (s) | trace, off (s) | off / on "
             f"(target <= {r['target_trace_ratio']}) | first call, on (s) | first call, off (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        settings = ", ".join(f"{k} {v}" for k, v in row["settings"].items()) or "PGD"
        on, off = row["autograph_on"], row["autograph_off"]
        lines.append(f"| {row['model']} width {row['width']} | {settings} | "
                     f"{on['trace_s']:.2f} | {off['trace_s']:.2f} "
                     f"| {row['trace_ratio']:.2f}{'' if row['meets_target'] else ' (missed)'} | "
                     f"{on['first_call_s']:.2f} | {off['first_call_s']:.2f} |")
    lines += ["", "The first call (graph optimization, kernel set-up) is the same graph either "
                  "way; only the trace changes.", ""]
    return "\n".join(lines)


def main(argv) -> int:
    import argparse

    from madry_ns import files

    parser = argparse.ArgumentParser(prog="python benchmarks/trace_cost.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(measure(_config(*spec["case"]), spec["autograph"])))
        return 0
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    command = " ".join(["python benchmarks/trace_cost.py", *argv])
    result = run(args.reps, command)
    text = markdown(result)
    print(text)
    base = os.path.join(HERE, "results", "trace-cost")
    files.atomic_write_text(base + ".json", json.dumps(result, indent=2) + "\n")
    files.atomic_write_text(base + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
