"""`graph_function`: `tf.function` with AutoGraph off, for the package's own compiled steps.

AutoGraph rewrites the Python source of every function a trace reaches (the model's layers,
the attack, the loss) so that `if`/`for` on tensors become graph control flow. madry_ns' code
has none of that: its loops are explicit `tf.while_loop`s and its branches are on Python
values (BN modes, config settings), so the rewrite changes nothing and costs time. AutoGraph
caches what it converts, so the cost falls on the first trace of each code path in a process:
every train.py run, evaluation, and script a test starts. `benchmarks/trace_cost.py` measures
it in fresh processes: a training step's trace takes 0.51-0.78x as long without it
(`benchmarks/results/trace-cost.md`). A body that does branch on a tensor fails loudly at
trace time ("using a tf.Tensor as a Python bool"), never silently.

`function_for(model)` picks it for the toolkit's own models and keeps `tf.function`
(AutoGraph on) for a plain Keras classifier a user brings, whose `call` may need it. Used by
the training step, eval.py's classifier and attack, the suite and the RNA study;
`attacks.compile_attack`, which sees only a logits function, keeps AutoGraph on.
"""

from __future__ import annotations

import functools

import tensorflow as tf

graph_function = functools.partial(tf.function, autograph=False)
graph_function.__doc__ = ("`tf.function(fn, autograph=False, **kwargs)`, as a call or a "
                          "decorator (see the module docstring for why).")


def function_for(model):
    """`graph_function` when `model` is one of the toolkit's classifiers, else `tf.function`."""
    from madry_ns.models import is_toolkit_model

    return graph_function if is_toolkit_model(model) else tf.function
