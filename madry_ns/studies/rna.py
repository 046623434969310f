"""The RNA study: a random-path defense evaluated so that its randomness cannot fool the number.

`python rna_eval.py --config CONFIG [--checkpoint PATH] [--protocols ...]` (the same command
as `python -m madry_ns.studies.rna`) evaluates
the latest checkpoint in model_dir (or PATH) on the first `num_eval_examples` test images,
under four protocols, each labelled with how its adversarial examples were generated and how
they were classified:

* (a) ``paper``: PGD on one random path per test batch, classified on fresh paths drawn
  independently (the released `evaluate_pgd_random_norms`: a transfer between paths);
* (b) ``fixed``: the same PGD examples classified on the very path they were generated on
  (white-box on a fixed path; clean accuracy on that path alongside);
* (c) ``eot``: EOT-PGD, each step's gradient averaged over K random paths, classified on
  fresh paths (Athalye et al.; what the authors' sibling method lost 18 points to);
* (d) ``aa_eot``: AutoAttack's 'rand' version: APGD-CE and APGD-DLR, each gradient averaged
  over K random paths (`attacks.apgd(eot_samples=K)`), an image counting as robust only
  if its clean image and both attacks' outputs are classified correctly, each on its own
  fresh path.

PGD settings (steps, epsilon, step size, loss, random start) are the config's (the paper
evaluates PGD-20: `--set num_steps=20`); APGD uses 100 steps and K = 20 by default, as
AutoAttack. Every classification on "fresh paths" is repeated on R independent paths, which
shows the randomness of the prediction itself: accuracy mean, std, min and max over the R
draws, the per-example agreement rate (share of the R predictions equal to the example's
most frequent one), the share of examples predicted the same on all R paths, and the share
classified correctly on all of them. All paths in a forward are shared by its batch (as
released: one path per batch, not per image). Everything is seeded (`inference_seed`,
`np_random_seed`): a rerun repeats itself, and a stopped run, continued with `--resume`
from the batches it saved beside its output (`partial_path`), equals an uninterrupted one.

A model without RNA layers (the plain-BN reference) is deterministic: every protocol is then
white-box PGD, EOT runs one draw, and the spread is trivially zero.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time

import numpy as np

# TensorFlow and the modules that import it load when a model is evaluated, so the command
# line checks its config and flags first (as every command's does).
from madry_ns import data, files, inference, rna, seeds
from madry_ns.errors import ConfigError

PAPER = ("Dong, Chen, Wang & Xu, 'Random Normalization Aggregation for Adversarial "
         "Defense', NeurIPS 2022, with the released evaluation")
PROTOCOLS = {"paper": "(a)", "fixed": "(b)", "eot": "(c)", "aa_eot": "(d)"}
ROWS = tuple(PROTOCOLS)  # the table's rows, as the other studies' ROWS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `evaluate` runs: protocols, R classification draws, EOT draws K, APGD steps."""

    protocols: tuple = tuple(PROTOCOLS)
    repeats: int = 10
    eot_samples: int = 20
    apgd_steps: int = 100

    def __post_init__(self):
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ConfigError(f"--protocols {','.join(self.protocols)}: expected a comma-"
                              f"separated list among {', '.join(PROTOCOLS)}")
        for name in ("repeats", "eot_samples", "apgd_steps"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ConfigError(f"--{name} {value}: expected a positive integer")


def describe(config, settings: Settings, deterministic: bool) -> dict:
    """Per protocol: its letter, how the examples were generated, how they were classified."""
    pgd = (f"PGD-{config.num_steps} ({config.loss_func}, eps {config.epsilon:g}, step "
           f"{config.step_size:g}{', random start' if config.random_start else ''})")
    k = 1 if deterministic else settings.eot_samples
    r = settings.repeats
    if deterministic:
        fresh = "the deterministic model (no RNA layers)"
        one = "one forward per test batch"
    else:
        fresh = f"{r} fresh random paths per test batch, drawn independently of the attack"
        one = "one random path per test batch"
    return {
        "clean": {"protocol": "clean", "generation": "none", "classification": fresh},
        "paper": {"protocol": "(a) paper", "generation": f"{pgd} on {one}",
                  "classification": fresh + ("" if deterministic else
                                             " (the paper's protocol: a transfer between "
                                             "paths)")},
        "fixed": {"protocol": "(b) fixed path", "generation": f"{pgd} on {one}",
                  "classification": "the path the attack ran on (white-box on a fixed path)"},
        "eot": {"protocol": "(c) EOT-PGD",
                "generation": f"EOT-{pgd}, each gradient averaged over {k} random paths",
                "classification": fresh},
        "aa_eot": {"protocol": "(d) AutoAttack-EOT",
                   "generation": (f"APGD-CE and APGD-DLR ({settings.apgd_steps} steps, eps "
                                  f"{config.epsilon:g}, AutoAttack's 'rand' version), each "
                                  f"gradient averaged over {k} random paths"),
                   "classification": fresh + "; robust = clean and both outputs correct, "
                                             "each on its own path"},
    }


def spread(correct: np.ndarray, predictions: np.ndarray | None = None) -> dict:
    """Statistics of [R, N] per-draw correctness (and predictions) over the R draws."""
    per_draw = correct.mean(axis=1)
    out = {"accuracy": float(per_draw.mean()), "accuracy_std": float(per_draw.std()),
           "accuracy_min": float(per_draw.min()), "accuracy_max": float(per_draw.max()),
           "repeats": int(correct.shape[0]),
           "correct_on_all_paths": float(correct.all(axis=0).mean()),
           "correct_on_any_path": float(correct.any(axis=0).mean())}
    if predictions is not None:
        counts = np.stack([(predictions == c).sum(axis=0)
                           for c in np.unique(predictions)])
        top = counts.max(axis=0)
        out["agreement"] = float((top / predictions.shape[0]).mean())
        out["unanimous"] = float((top == predictions.shape[0]).mean())
    return out


class _Compiled:
    """The protocols' compiled functions, each traced once per batch shape."""

    def __init__(self, model, config, settings: Settings):
        import tensorflow as tf

        from madry_ns import attacks
        from madry_ns.graph import function_for
        self.deterministic = not rna.has_rna(model)
        forward = inference.path_forward(model, config)
        bn_mode = inference.get(config.inference_bn).bn_mode
        params = attacks.config_params(config)
        loss = attacks.LOSSES[params["loss_func"]]
        k = 1 if self.deterministic else settings.eot_samples
        compile_fn = function_for(model)  # tf.function; AutoGraph off for toolkit models

        @compile_fn(reduce_retracing=True)
        def predict(x, seeds):
            """[R, B] predicted labels, the r-th on the path of seeds[r]."""
            out = tf.TensorArray(tf.int64, size=tf.shape(seeds)[0])

            def body(r, out):
                return r + 1, out.write(r, tf.argmax(forward(x, seeds[r]), 1))

            _, out = tf.while_loop(lambda r, _: r < tf.shape(seeds)[0], body,
                                   (tf.constant(0), out))
            return out.stack()

        @compile_fn(reduce_retracing=True)
        def pgd(x, y, path_seed, start_seed):
            model.resample(path_seed)
            return attacks.pgd_attack(model, x, y, bn_mode=bn_mode, seed=start_seed, **params)

        @compile_fn(reduce_retracing=True)
        def eot(x, y, seed):
            return attacks.eot_pgd(lambda z, s: tf.reduce_sum(loss(forward(z, s), y)), x,
                                   epsilon=config.epsilon, num_steps=config.num_steps,
                                   step_size=config.step_size, eot_samples=k,
                                   random_start=config.random_start, seed=seed)

        def make_apgd(kind):
            @compile_fn(reduce_retracing=True)
            def run(x, y, seed):
                return attacks.apgd(forward, x, y, epsilon=config.epsilon,
                                    num_steps=settings.apgd_steps, loss=kind, seed=seed,
                                    eot_samples=k)
            return run

        self.predict, self.pgd, self.eot = predict, pgd, eot
        self.apgd = {"apgd-ce": make_apgd("xent"), "apgd-dlr": make_apgd("dlr")}


@dataclasses.dataclass
class Partial:
    """What a run has made so far: its first `batches` test batches' labels `y` and, per
    prediction (`clean`, `paper`, `fixed`, `clean_fixed`, `eot`, `apgd-ce`, `apgd-dlr`), the
    [R, images] predicted labels, with the attack seconds spent. Every batch's paths, starts
    and draws are seeded by its index, so a run continued from a `Partial` equals an
    uninterrupted one."""

    batches: int
    y: np.ndarray
    preds: dict
    seconds: dict


def evaluate(model, dataset: data.Dataset, config, settings: Settings = Settings(),
             on_batch=None, resume: Partial | None = None, save=None) -> dict:
    """Run `settings.protocols` on the first `num_eval_examples` test images in batches of
    `eval_batch_size`; return per protocol its labels and `spread` statistics.

    `on_batch(index, num_batches)` is called after each batch, `save(partial)` too, with
    the `Partial` made so far. With `resume` (an earlier run's `Partial` under the same
    settings), its batches are not run again; the first batch's clean predictions are made
    again and must equal its own (else ConfigError: other weights under the same path).

    It runs with Grappler's arithmetic rewrite off (`arithmetic_rewrite_off`, as the suite
    does for random-path models): APGD's EOT loop nested in its step loop hit
    tensorflow#23780 (AlreadyExistsError after a finished first batch) on Fashion-MNIST, on
    the RNA model and on the plain-BN one alike, whose EOT loop runs a single draw.
    """
    from madry_ns.evaluate.suite import arithmetic_rewrite_off
    with arithmetic_rewrite_off():
        return _evaluate(model, dataset, config, settings, on_batch, resume, save)


def _evaluate(model, dataset, config, settings, on_batch, resume, save) -> dict:
    import tensorflow as tf

    from madry_ns import attacks, evaluation
    fns = _Compiled(model, config, settings)
    labels = describe(config, settings, fns.deterministic)
    repeats = 1 if fns.deterministic else settings.repeats
    wanted = set(settings.protocols)

    def draw(stream, *data):
        return seeds.rna_protocol(config, stream, *data)

    def fresh(target, i):
        return tf.stack([draw("rna_classify", seeds.RNA_CLASSIFY_TARGETS[target], i, r)
                         for r in range(repeats)])

    y_all, preds, seconds, done = [], {}, {}, 0
    if resume is not None:
        y_all = [resume.y]
        preds = {name: [value] for name, value in resume.preds.items()}
        seconds, done = dict(resume.seconds), resume.batches

    def record(name, value):
        preds.setdefault(name, []).append(np.asarray(value))

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return value

    n = config.num_eval_examples
    num_batches = -(-n // config.eval_batch_size)
    batches = data.eval_batches(dataset.test_images, dataset.test_labels, n,
                                config.eval_batch_size)
    for i, (x, y) in enumerate(batches):
        x, y = tf.constant(x), tf.constant(y, tf.int64)
        if i < done:
            if i == 0:
                _check_same_model(fns.predict(x, fresh("clean", 0)).numpy(), resume)
            continue
        y_all.append(y.numpy())
        record("clean", fns.predict(x, fresh("clean", i)))
        if wanted & {"paper", "fixed"}:
            path = draw("rna_attack_path_eval", i)
            x_adv = timed("paper+fixed",
                          lambda: fns.pgd(x, y, path, draw("rna_start", i)).numpy())
            if "paper" in wanted:
                record("paper", fns.predict(x_adv, fresh("paper", i)))
            if "fixed" in wanted:
                record("fixed", fns.predict(x_adv, path[None]))
                record("clean_fixed", fns.predict(x, path[None]))
        if "eot" in wanted:
            x_adv = timed("eot", lambda: fns.eot(x, y, draw("rna_eot", i)).numpy())
            record("eot", fns.predict(x_adv, fresh("eot", i)))
        if "aa_eot" in wanted:
            for j, name in enumerate(("apgd-ce", "apgd-dlr")):
                x_adv = timed("aa_eot",
                              lambda: fns.apgd[name](x, y, draw("rna_aa", i, j)).numpy())
                record(name, fns.predict(x_adv, fresh(name, i)))
        if save:
            save(Partial(i + 1, np.concatenate(y_all),
                         {name: np.concatenate(parts, axis=1) for name, parts in preds.items()},
                         dict(seconds)))
        if on_batch:
            on_batch(i, num_batches)

    y_all = np.concatenate(y_all)
    pred = {name: np.concatenate(parts, axis=1) for name, parts in preds.items()}
    correct = correct_by_protocol(y_all, pred)
    results = {"clean": {**labels["clean"], **spread(correct["clean"], pred["clean"])}}
    if "paper" in wanted:
        results["paper"] = {**labels["paper"], **spread(correct["paper"], pred["paper"])}
    if "fixed" in wanted:
        results["fixed"] = {**labels["fixed"], **spread(correct["fixed"]),
                            "clean_accuracy_on_path": float(correct["clean_fixed"].mean())}
    if "eot" in wanted:
        results["eot"] = {**labels["eot"], **spread(correct["eot"], pred["eot"])}
    if "aa_eot" in wanted:
        results["aa_eot"] = {**labels["aa_eot"], **spread(correct["aa_eot"]),
                             "apgd-ce": spread(correct["apgd-ce"], pred["apgd-ce"]),
                             "apgd-dlr": spread(correct["apgd-dlr"], pred["apgd-dlr"])}
    return {"num_examples": n, "model": config.model, "norm_layer": config.norm_layer,
            "paths": (evaluation.rna_space(config) + f", {model.num_paths():,} paths"
                      if not fns.deterministic else "deterministic (no RNA layers)"),
            "settings": {**dataclasses.asdict(settings), "repeats": repeats,
                         "eot_samples": 1 if fns.deterministic else settings.eot_samples,
                         **attacks.config_params(config), "inference_seed":
                         config.inference_seed, "np_random_seed": config.np_random_seed},
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "results": results}


def correct_by_protocol(y: np.ndarray, preds: dict) -> dict:
    """Prediction name -> [R, images] bool, correct or not, draw by draw, from the labels `y`
    and the [R, images] predictions (a `Partial`'s, or a finished run's `load_per_image`),
    with `aa_eot` as `evaluate` counts it: the clean image and both APGD outputs correct,
    each on its own draw r."""
    correct = {name: p == y[None] for name, p in preds.items()}
    if "apgd-ce" in correct:
        correct["aa_eot"] = correct["clean"] & correct["apgd-ce"] & correct["apgd-dlr"]
    return correct


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def table(result: dict, name: str = "") -> str:
    """A markdown table of one `evaluate` result: a row per protocol."""
    rows = ["| model | protocol | generation | classification | accuracy % (mean ± std "
            "over draws) | min-max % | correct on all draws % | agreement | unanimous % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["results"].values():
        agreement = f"{entry['agreement']:.3f}" if "agreement" in entry else "-"
        unanimous = _pct(entry["unanimous"]) if "unanimous" in entry else "-"
        extra = (f" (clean on that path {_pct(entry['clean_accuracy_on_path'])})"
                 if "clean_accuracy_on_path" in entry else "")
        rows.append(
            f"| {name} | {entry['protocol']} | {entry['generation']} | "
            f"{entry['classification']} | {_pct(entry['accuracy'])} ± "
            f"{_pct(entry['accuracy_std'])}{extra} | {_pct(entry['accuracy_min'])}-"
            f"{_pct(entry['accuracy_max'])} | {_pct(entry['correct_on_all_paths'])} | "
            f"{agreement} | {unanimous} |")
    return "\n".join(rows)


def _check_same_model(clean: np.ndarray, resume: Partial) -> None:
    made = resume.preds["clean"][:, :clean.shape[1]]
    if not np.array_equal(clean, made):
        raise ConfigError(
            f"--resume: the first test batch's clean predictions differ from the stopped "
            f"run's on {int((clean != made).any(axis=0).sum())} of {clean.shape[1]} images: "
            f"the checkpoint under that name holds other weights; drop --resume")


def identity(config, path: str, source: str, settings: Settings) -> dict:
    """What makes two runs one experiment, compared by --resume: the checkpoint, the images,
    the protocols' settings, the attack's parameters, the seeds and the random-path space."""
    from madry_ns import attacks

    keys = ("model", "norm_layer", "rna_candidates", "rna_sampling", "rna_inference_path",
            "inference_bn", "num_eval_examples", "eval_batch_size", "inference_seed",
            "np_random_seed")
    return json.loads(json.dumps(
        {"checkpoint": path, "dataset": source, "settings": dataclasses.asdict(settings),
         "attack": attacks.config_params(config),
         **{k: getattr(config, k) for k in keys}}))


def partial_path(output: str) -> str:
    """Where a run appending to `output` keeps its finished batches until it is done."""
    return output + ".partial.npz"


def per_image_path(output: str, line: int) -> str:
    """Where the per-image predictions of the `line`-th record (from 1) of `output` are kept:
    rna_eval.jsonl's third evaluation keeps them in rna_eval.3.npz beside it."""
    return f"{os.path.splitext(output)[0]}.{line}.npz"


def load_per_image(path: str) -> tuple:
    """(labels [images], {prediction name: [R, images] predicted labels}) of a finished run's
    per-image file (its record's "per_image", beside its output); `correct_by_protocol`
    turns them into each protocol's outcomes."""
    try:
        _, y, preds = _read_predictions(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read the per-image predictions {path}: {e}") from None
    return y, preds


def _read_predictions(path: str) -> tuple:
    """(meta, y, preds) of a file `_save_partial` wrote."""
    with np.load(path, allow_pickle=False) as z:
        return (json.loads(str(z["meta"])), z["y"],
                {k[len("pred__"):]: z[k] for k in z.files if k.startswith("pred__")})


def _save_partial(where: str, run: dict, partial: Partial, elapsed: float) -> None:
    meta = {"identity": run, "batches": partial.batches, "seconds": partial.seconds,
            "elapsed": elapsed}
    arrays = {"meta": np.array(json.dumps(meta)), "y": partial.y,
              **{f"pred__{name}": value for name, value in partial.preds.items()}}
    with files.atomic_open(where, "wb") as f:
        np.savez(f, **arrays)


def _load_partial(where: str, run: dict) -> tuple:
    """(Partial, seconds elapsed) of the stopped run in `where`; ConfigError if it cannot be
    read or was made as another experiment (mixing the two would make one table of two)."""
    try:
        meta, y, preds = _read_predictions(where)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume: cannot read {where}: {e}; delete it or drop --resume") \
            from None
    for key, value in run.items():
        if meta["identity"].get(key) != value:
            raise ConfigError(f"--resume: {where} was made with {key} "
                              f"{meta['identity'].get(key)!r}, this run {value!r}; use "
                              f"another --output or drop --resume")
    return Partial(meta["batches"], y, preds, meta["seconds"]), meta["elapsed"]


def _records(output: str) -> list:
    if not os.path.exists(output):
        return []
    with open(output, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _finished(output: str, run: dict) -> dict | None:
    return next((r for r in reversed(_records(output)) if r.get("identity") == run), None)


def evaluate_checkpoint(config, path: str | None = None, settings: Settings = Settings(),
                        output: str | None = None, out=print, resume: bool = False) -> dict:
    """Evaluate checkpoint `path` (default: the latest in model_dir), print the table and
    append the result as one JSON line to `output` (default model_dir/eval/rna_eval.jsonl).

    After every test batch the batches made so far are saved beside `output`
    (`partial_path`), and removed once the line is appended; the finished run's per-image
    predictions stay beside it (`per_image_path`, named in the record's "per_image", read
    by `load_per_image`), for paired comparisons between models. With `resume`, a run stopped
    under the same `identity` continues after its last saved batch, and a finished one (a
    line of `output` with that identity) is returned as it is, without running anything.
    """
    from madry_ns import checkpoints
    from madry_ns.challenge import load_checkpoint_model
    from madry_ns.progress import Progress

    path = path or checkpoints.latest_checkpoint(config.model_dir)
    if path is None:
        raise checkpoints.CheckpointError(
            f"no checkpoint in model_dir '{config.model_dir}' to evaluate")
    output = output or os.path.join(config.model_dir, "eval", "rna_eval.jsonl")
    dataset = data.load_dataset(config)
    run = identity(config, path, dataset.source, settings)
    where = partial_path(output)
    earlier, elapsed = None, 0.0
    if resume:
        done = _finished(output, run)
        if done is not None:
            out(f"--resume: {output} already holds this evaluation (of {done['time']}); "
                f"nothing to run")
            return done
        if os.path.exists(where):
            earlier, elapsed = _load_partial(where, run)
            out(f"--resume: {earlier.batches} test batches from {where}")
        else:
            out(f"--resume: nothing in {where} yet, starting afresh")
    elif os.path.exists(where):
        out(f"{where} holds a stopped run; starting afresh over it (--resume continues it)")
    model = load_checkpoint_model(config, path)
    bar = Progress(-(-config.num_eval_examples // config.eval_batch_size), "rna_eval")
    if earlier is not None:
        bar.update(earlier.batches)
    start = time.perf_counter() - elapsed
    last = [earlier]  # a resumed run that had saved its last batch saves nothing more

    def save(partial):
        last[0] = partial
        _save_partial(where, run, partial, time.perf_counter() - start)

    result = evaluate(model, dataset, config, settings, on_batch=lambda i, n: bar.update(),
                      resume=earlier, save=save)
    bar.close()
    per_image = per_image_path(output, len(_records(output)) + 1)
    record = {"checkpoint": path, "step": checkpoints.checkpoint_step(path),
              "dataset": dataset.source, **result,
              "total_seconds": round(time.perf_counter() - start, 2),
              "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "resumed_batches": earlier.batches if earlier else 0, "identity": run,
              "per_image": os.path.basename(per_image)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # The predictions before the line that names them, so that neither outlives the other's
    # absence (a stale file of an unfinished line is overwritten by the next run).
    _save_partial(per_image, run, last[0], record["total_seconds"])
    files.atomic_append_line(output, json.dumps(record))
    if os.path.exists(where):
        os.unlink(where)
    out(f"checkpoint {path}, {result['num_examples']} test images of {dataset.source}; "
        f"paths: {result['paths']}")
    out(table(result, config.model))
    out(f"appended to {output}")
    return record


# The study's entry point under the name every study uses.
run = evaluate_checkpoint


def main(argv=None, prog: str = "python -m madry_ns.studies.rna") -> int:
    """The command line (`python rna_eval.py` is this with its own prog)."""
    from madry_ns import cli

    def command(config, args):
        chosen = {"protocols": args.protocols or None, "repeats": args.repeats,
                  "eot_samples": args.eot_samples, "apgd_steps": args.apgd_steps}
        settings = Settings(**{k: v for k, v in chosen.items() if v is not None})
        evaluate_checkpoint(config, args.checkpoint, settings, args.output,
                            resume=args.resume)

    parser = cli.Parser(prog, __doc__, command)  # unset flags: Settings' defaults
    add = parser.add_argument
    add("--checkpoint", metavar="PREFIX", help="default: the latest in model_dir")
    add("--protocols", type=cli.comma_list, help="comma-separated, among "
        f"{', '.join(PROTOCOLS)} (default: all)")
    add("--repeats", type=int, help="R: fresh random paths per classification (default 10)")
    add("--eot_samples", type=int, help="K: random paths per EOT gradient (default 20)")
    add("--apgd_steps", type=int, help="APGD iterations (default 100)")
    add("--output", metavar="PATH", help="JSON lines file the result is appended to "
        "(default model_dir/eval/rna_eval.jsonl)")
    add("--resume", action="store_true", help="continue a run stopped under the same "
        "checkpoint and settings after its last finished batch (kept in OUTPUT.partial.npz); "
        "a finished one is not run again")
    return cli.run(parser, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
