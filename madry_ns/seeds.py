"""Every seed stream of the toolkit, by name, in one place.

All randomness is stateless: a draw is a function of a two-integer seed, so a rerun, a resumed
run and a run in another order repeat each other. Each kind of draw has its own *stream*, a
named integer mixed into the seed, so that adding a draw never shifts another. The integers
below are the ones the toolkit has always used (the numbers recorded in `docs/` depend on
them); they are fixed by name here, never by a position in a list.

Two ways of mixing a stream into a seed are in use, both kept for reproducibility:

* **offset** (the suite and the drop-in evaluation): the second component of
  `(base, index)` is shifted, e.g. the attacker's own reference draw for batch i is
  `(inference_seed, ATTACKER_DRAW_OFFSET + i)`, and a suite row's random starts for batch i
  are `(np_random_seed, stream * ROW_STRIDE + i)`;
* **fold** (training with RNA, the RNA protocols, attacks' internal draws):
  `tf.random.experimental.stateless_fold_in` of the stream into the seed, see `fold`.

A suite row or study added outside this module names its stream; a name not in `STREAMS` gets
a stable id from its name (`stream_id`), far from the fixed ones, so a new row needs no edit
here and never moves another row's numbers.
"""

from __future__ import annotations

import zlib

# ---- Offsets of the second seed component (the suite and eval.py) ----
# The attacker's own shaped-inference references (or RNA path) for batch i, beside the
# defense's draw (inference_seed, i): far above any batch index.
ATTACKER_DRAW_OFFSET = 1_000_000_000
# A suite row's random starts for batch i: (np_random_seed, stream * ROW_STRIDE + i).
ROW_STRIDE = 100_003
# Shaped inference's final partial chunk draws its references from seed + (0, TAIL_OFFSET).
SHAPED_TAIL_OFFSET = 1_000_003

# ---- Named streams ----
STREAMS = {
    # Suite rows (`python -m madry_ns.evaluate`): the random starts of each row's attack.
    # The ids are the rows' positions in the table as it stood when docs/evaluation/ was
    # recorded; adaptive PGD and the sanity checks share "suite_pgd" (+ restart).
    "fgsm": 0, "fgsm16": 1, "cleverhans_pgd": 2, "mim": 3, "cw": 4, "deepfool": 5,
    "shaping_attack": 6, "eot": 9, "autoattack": 10, "suite_pgd": 1000,
    # RNA training: folded into the training seed (np_random_seed, step).
    "rna_attack_path": 1, "rna_train_path": 2,
    # RNA protocols (rna_eval.py): folded into (inference_seed, 0).
    "rna_classify": 1, "rna_attack_path_eval": 2, "rna_start": 3, "rna_eot": 4, "rna_aa": 5,
    # Best-checkpoint selection (`madry_ns.selection`): the held-out training images, one
    # shuffle folded into (np_random_seed, 0) with an id no other draw folds there.
    "select_heldout": 2000,
}
# What the RNA protocols classify: each gets its own classification paths (folded after
# "rna_classify").
RNA_CLASSIFY_TARGETS = {"clean": 0, "paper": 1, "eot": 2, "apgd-ce": 3, "apgd-dlr": 4}

# Ids given to unlisted names start here, above every fixed id and below 2**31.
_HASHED_BASE = 1 << 20


def stream_id(name: str) -> int:
    """The integer of stream `name`: its fixed id, or for a name not in `STREAMS` a stable
    id derived from the name (CRC-32), so an added suite row or study has its own stream
    without an edit here."""
    if name in STREAMS:
        return STREAMS[name]
    return _HASHED_BASE + zlib.crc32(name.encode("utf-8")) % ((1 << 31) - _HASHED_BASE)


def pair(first, second):
    """The int64 seed tensor (first, second)."""
    import tensorflow as tf

    return tf.stack([tf.cast(first, tf.int64), tf.cast(second, tf.int64)])


def fold(seed, *data):
    """`seed` (two integers) with each of `data` folded in, statelessly."""
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    for d in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
    return seed


def training(config, step):
    """The (np_random_seed, step) pair a training step's randomness derives from (PGD
    starts, TRADES' start noise, RNA paths)."""
    return pair(config.np_random_seed, step)


def reference_draw(config, index):
    """The defense's shaped-inference references (or RNA path) for batch `index`."""
    return pair(config.inference_seed, index)


def attacker_draw(seed):
    """The attacker's own draw beside the defense's `seed` (inference_seed, i): the same
    distribution, independent of what the defense will use."""
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    return seed + tf.constant([0, ATTACKER_DRAW_OFFSET], tf.int64)


def row_start(config, stream: str, index, restart: int = 0):
    """Random starts of suite row stream `stream` (restart `restart`) for batch `index`."""
    import tensorflow as tf

    row = tf.constant(stream_id(stream) + restart, tf.int64)
    return pair(config.np_random_seed, row * ROW_STRIDE + tf.cast(index, tf.int64))


def eval_start(config, index):
    """eval.py / pgd_attack.py: PGD random starts for batch `index`."""
    return pair(config.np_random_seed, index)


def rna_protocol(config, stream: str, *data):
    """The RNA protocols' draws: (inference_seed, 0) with the stream and `data` folded in."""
    return fold(pair(config.inference_seed, 0), STREAMS[stream], *data)


def heldout(config):
    """The seed of the held-out training images of best-checkpoint selection."""
    return fold(pair(config.np_random_seed, 0), STREAMS["select_heldout"])
