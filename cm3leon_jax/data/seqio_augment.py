"""`retrieval_augment`, the SeqIO preprocessor of the pretraining and SFT tasks: tokenized
shards -> CM3 examples (`targets`, `loss_weights`).

The random work (which neighbors, which spans) happens in `augment.py`'s numpy
functions, called through `tf.numpy_function` with a seed that seqio hands to
each example, so the same task seed always yields the same examples whatever
the parallelism.
"""

from __future__ import annotations

import functools
from typing import Callable

import gin
import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax.data import augment


def _make_example(ids, neighbor_ids, neighbor_lengths, seed, *, layout, config):
    candidates = np.split(neighbor_ids, np.cumsum(neighbor_lengths)[:-1]) \
        if neighbor_lengths.size else []
    rng = np.random.default_rng(np.asarray(seed, np.uint32).tolist())
    out = augment.make_example(ids, candidates, rng, layout, config)
    if out is None:  # The query cannot fit: an empty example, filtered below.
        return np.zeros([0], np.int32), np.zeros([0], np.int32)
    tokens, weights = out
    return tokens, weights.astype(np.int32)


@gin.configurable(denylist=["dataset", "output_features", "sequence_length", "check_fits"])
def retrieval_augment(dataset: tf.data.Dataset,
                      output_features: dict,
                      sequence_length: dict | None = None,
                      k_probs: tuple[float, ...] = (0.0, 0.0, 1.0),
                      mean_spans: float = 1.0,
                      max_spans: int = 8,
                      neighbors_in_query_order: bool = False,
                      check_fits: Callable[[augment.AugmentConfig], None] | None = None
                      ) -> tf.data.Dataset:
    """Assembles `retrieved <eos> ... query`, applies CM3, drops what cannot fit.

    The sequence length comes from the task's `sequence_length["targets"]`; k_probs,
    mean_spans, max_spans and neighbors_in_query_order are `augment.AugmentConfig`'s.
    `check_fits(config)`, when given, raises before anything is read if an example cannot
    fit `config.budget`: the length filter would drop it without a word, and seqio repeats
    a dataset that the filter left empty forever. `max_spans` beyond the layout's sentinels
    is refused here too (`augment.check_sentinels`).
    """
    if not sequence_length or "targets" not in sequence_length:
        raise ValueError("retrieval_augment needs sequence_length['targets'] "
                         "(the packed length, e.g. 4096).")
    config = augment.AugmentConfig(seq_len=sequence_length["targets"],
                                   k_probs=tuple(k_probs),
                                   mean_spans=mean_spans, max_spans=max_spans,
                                   neighbors_in_query_order=neighbors_in_query_order)
    vocabulary = output_features["targets"].vocabulary
    layout = vocabulary.layout
    augment.check_sentinels(config, vocabulary)
    if check_fits is not None:
        check_fits(config)
    fn = functools.partial(_make_example, layout=layout, config=config)

    @seqio.map_over_dataset(num_seeds=1)
    def _map(ex, seed):
        tokens, weights = tf.numpy_function(
            fn, [ex["ids"], ex["neighbor_ids"], ex["neighbor_lengths"], seed],
            [tf.int32, tf.int32], stateful=False)
        tokens.set_shape([None])
        weights.set_shape([None])
        return {"targets": tokens, "loss_weights": weights}

    return _map(dataset).filter(lambda ex: tf.size(ex["targets"]) > 0)
