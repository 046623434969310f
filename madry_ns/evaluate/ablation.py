"""The norm-shaping paper's Table IV: checkpoints (one per training ratio) under shaped
inference at each inference ratio 1:r, with PGD generated on PN (the paper's protocol)
beside the exact adaptive PGD through the shaped forward.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from madry_ns.errors import ConfigError
from madry_ns.evaluate import reports
from madry_ns.evaluate.suite import Settings, Suite, batches, load_checkpoint, pgd_accuracy

ABLATION_RATIOS = (0, 1, 3, 9, 19, 49)


def ablation(config, paths: list, labels: list, ratios=ABLATION_RATIOS, out=print) -> dict:
    """Each checkpoint under BN+Shaping at each inference ratio: clean accuracy, PGD generated
    on PN (the paper's Table IV) and the exact adaptive PGD through the shaped forward."""
    from madry_ns import data

    if len(paths) != len(labels):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints; "
                          f"give one per checkpoint")
    for r in ratios:
        if r < 0 or config.eval_batch_size % (r + 1):
            raise ConfigError(f"--ratios {r}: eval_batch_size {config.eval_batch_size} must "
                              f"split into chunks of 1 + {r}")
    dataset = data.load_dataset(config)
    grid = {"clean": {}, "transfer": {}, "adaptive": {}}
    for label, path in zip(labels, paths):
        _, model = load_checkpoint(config, path)
        for g in grid.values():
            g[label] = {}
        pn_examples = None  # generated on PN: the same for every inference ratio
        for r in ratios:
            start = time.perf_counter()
            c = config.replace(inference_bn="shaped", inference_ratio=r,
                               inference_mixing="per_batch")
            settings = Settings(attacks=("pgd", "adaptive"), modes=("shaped",), sanity=False)
            suite = Suite(model, c, dataset, settings)
            test_batches = batches(dataset, c)
            y = np.concatenate([b[1] for b in test_batches])
            tf = suite.tf
            if pn_examples is None:
                generate = suite.generator("pgd", None)
                pn_examples = [generate(tf.constant(x), tf.constant(yb, tf.int64),
                                        tf.constant(i, tf.int64)).numpy()
                               for i, (x, yb) in enumerate(test_batches)]
            clean, transfer = [], []
            for i, ((x, _), adv) in enumerate(zip(test_batches, pn_examples)):
                clean.append(suite.classify("shaped", x, i))
                transfer.append(suite.classify("shaped", adv, i))
            grid["clean"][label][str(r)] = float((np.concatenate(clean) == y).mean())
            grid["transfer"][label][str(r)] = float((np.concatenate(transfer) == y).mean())
            grid["adaptive"][label][str(r)] = float(pgd_accuracy(suite, test_batches,
                                                                  "shaped").mean())
            pct = {kind: reports.pct(grid[kind][label][str(r)]) for kind in grid}
            out(f"{label} 1:{r}: clean {pct['clean']}  PN-generated PGD {pct['transfer']}  "
                f"adaptive PGD {pct['adaptive']}  ({time.perf_counter() - start:.1f} s)")
    return {"checkpoints": dict(zip(labels, paths)), "ratios": list(ratios),
            "num_examples": config.num_eval_examples, "dataset": dataset.source,
            "eval_batch_size": config.eval_batch_size, "epsilon": config.epsilon,
            "num_steps": config.num_steps, "step_size": config.step_size, "grid": grid}



def run_ablation(config, paths, labels, ratios, output: str, command: str = "",
                 out=print) -> dict:
    from madry_ns import files

    result = ablation(config, paths, labels, ratios, out=out)
    os.makedirs(output, exist_ok=True)
    files.atomic_write_text(os.path.join(output, "ablation.json"),
                            json.dumps({**result, "command": command}, indent=2) + "\n")
    text = reports.ablation_markdown(result, command)
    files.atomic_write_text(os.path.join(output, "ablation.md"), text)
    reports.ablation_heatmap(result, os.path.join(output, "ablation.png"))
    out(text)
    out(f"wrote {output}/ablation.md, ablation.json, ablation.png")
    return result

