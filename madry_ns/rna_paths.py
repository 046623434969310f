"""The random path of Random Normalization Aggregation (Dong et al., NeurIPS 2022), as
methods every model inherits (`models._Classifier`).

A path is the int32 vector of the active candidate of every RNA layer (`layers.RandomNorm`),
in forward order. Sampling is stateless in an explicit seed, so it runs inside compiled
functions (a training step resamples twice without leaving the graph) and repeats under a
seed. A model without RNA layers has the empty path, and one path.
"""

from __future__ import annotations

import tensorflow as tf

from madry_ns.layers import RandomNorm

RNA_SAMPLING = ("per_layer", "network")


class RandomPaths:
    """The path API of a model whose RNA layers `_sublayers()` lists in forward order and
    whose default sampling is `self.rna_sampling`."""

    def rna_layers(self) -> list[RandomNorm]:
        """Every `RandomNorm` layer, in forward order."""
        return [layer for layer in self._sublayers() if isinstance(layer, RandomNorm)]

    def rna_candidates(self) -> tuple:
        """The candidate names every RNA layer shares (empty without RNA layers)."""
        layers = self.rna_layers()
        names = {layer.candidates for layer in layers}
        if len(names) > 1:
            raise ValueError(f"RNA layers with different candidates: {sorted(names)}")
        return names.pop() if names else ()

    def num_paths(self, sampling: str | None = None) -> int:
        """How many paths `resample` can draw: candidates^layers per layer, candidates for
        one type for the whole network ("network"); 1 without RNA layers."""
        sampling = self._sampling(sampling)
        n, layers = len(self.rna_candidates()), len(self.rna_layers())
        if not layers:
            return 1
        return n if sampling == "network" else n ** layers

    def path(self) -> tf.Tensor:
        """The active path: int32 [num RNA layers], candidate indices."""
        layers = self.rna_layers()
        if not layers:
            return tf.zeros([0], tf.int32)
        return tf.stack([tf.convert_to_tensor(layer.choice) for layer in layers])

    def path_names(self) -> list[str]:
        """The active path as candidate names (eager)."""
        return [layer.candidates[int(c)] for layer, c in zip(self.rna_layers(), self.path())]

    def sample_path(self, seed, sampling: str | None = None) -> tf.Tensor:
        """A uniformly random path, a function of `seed` (two integers) only: per layer
        independently ("per_layer", the released `--mixed`) or one candidate for every
        layer ("network"). Nothing is assigned."""
        sampling = self._sampling(sampling)
        layers = self.rna_layers()
        if not layers:
            return tf.zeros([0], tf.int32)
        n = len(self.rna_candidates())
        seed = tf.cast(seed, tf.int64)
        if sampling == "network":
            one = tf.random.stateless_uniform([], seed, minval=0, maxval=n, dtype=tf.int32)
            return tf.fill([len(layers)], one)
        return tf.random.stateless_uniform([len(layers)], seed, minval=0, maxval=n,
                                           dtype=tf.int32)

    def resample(self, seed, sampling: str | None = None) -> tf.Tensor:
        """Draw a path with `sample_path(seed, sampling)`, make it active, return it.
        Works eagerly and inside tf.functions; assigning variables never retraces."""
        path = self.sample_path(seed, sampling)
        self._assign_path(path)
        return path

    def set_path(self, choices) -> None:
        """Fix the path: one candidate name for every layer ("bn"), or one entry per RNA
        layer (names or indices, a list or an int tensor)."""
        layers = self.rna_layers()
        if isinstance(choices, str):
            choices = [choices] * len(layers)
        if isinstance(choices, (list, tuple)):
            if len(choices) != len(layers):
                raise ValueError(f"a path needs {len(layers)} choices (one per RNA layer), "
                                 f"got {len(choices)}")
            indices = []
            for layer, choice in zip(layers, choices):
                if isinstance(choice, str):
                    if choice not in layer.candidates:
                        raise ValueError(f"{choice!r} is not a candidate of {layer.name} "
                                         f"{list(layer.candidates)}")
                    choice = layer.candidates.index(choice)
                if not 0 <= int(choice) < layer.num_candidates:
                    raise ValueError(f"choice {choice} out of range for {layer.name} "
                                     f"({layer.num_candidates} candidates)")
                indices.append(int(choice))
            choices = tf.constant(indices, tf.int32)
        else:
            choices = tf.cast(choices, tf.int32)
            n = len(self.rna_candidates())
            tf.debugging.assert_equal(tf.size(choices), len(layers), "one choice per RNA layer")
            tf.debugging.assert_non_negative(choices, "RNA choices must be >= 0")
            tf.debugging.assert_less(choices, n, f"RNA choices must be < {n}")
        self._assign_path(choices)

    def _assign_path(self, choices):
        layers = self.rna_layers()
        if layers:
            for layer, choice in zip(layers, tf.unstack(choices, num=len(layers))):
                layer.choice.assign(choice)

    def _sampling(self, sampling):
        sampling = sampling or self.rna_sampling
        if sampling not in RNA_SAMPLING:
            raise ValueError(f"RNA sampling must be one of {RNA_SAMPLING}, got {sampling!r}")
        return sampling
