"""The packed decoder layout the trainer reads, as a seqio FeatureConverter.

Task features: `targets` (int32 ids after the CM3 transform) and
`loss_weights` (int32 0/1, 0 on sentinels; float32 once converted). Two examples packed
into length 10::

    example 1: targets      a  <s0> c  <s0> b  <eoss>     loss_weights 1 0 1 0 1 1
    example 2: targets      x  y  z                       loss_weights 1 1 1

    decoder_target_tokens   a  <s0> c  <s0> b  <eoss> x     y  z  <pad>
    decoder_input_tokens    <eos> a <s0> c <s0> b     <eos> x  y  <pad>
    decoder_loss_weights    1  0  1  0  1  1          1     1  1  0
    decoder_segment_ids     1  1  1  1  1  1          2     2  2  0
    decoder_positions       0  1  2  3  4  5          0     1  2  0

Inputs are the targets shifted right within each segment, starting with
`bos_id`, which the trainer sets to the token the task vocabulary opens prompts
with (`data.opening_id`: `<eos>` for ours, the paper's `<eos> caption <break>`;
Chameleon's `<s>` for an imported Chameleon vocabulary), so training and
inference see the same first token. Examples are
never split across rows (seqio packing places whole examples; `augment.py`
guarantees each fits).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec


class CM3FeatureConverter(seqio.FeatureConverter):
    """targets + loss_weights -> packed decoder features (see module docstring)."""

    TASK_FEATURES = {
        "targets": FeatureSpec(dtype=tf.int32),
        # 0/1 weights, int32 (see `_convert_features` for why).
        "loss_weights": FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "decoder_target_tokens": FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": FeatureSpec(dtype=tf.float32),
    }
    PACKING_FEATURE_DTYPES = {
        "decoder_segment_ids": tf.int32,
        "decoder_positions": tf.int32,
    }

    def __init__(self, *, bos_id: int, pack: bool = True, **kwargs):
        super().__init__(pack=pack, bos_id=bos_id, **kwargs)

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # loss_weights always has the targets' length; callers name only that.
        lengths = dict(task_feature_lengths)
        lengths.setdefault("loss_weights", lengths["targets"])
        return super().__call__(ds, lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict:
        segment_ids = features.get("targets_segment_ids")
        out = {
            "decoder_target_tokens": features["targets"],
            "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
                features["targets"], sequence_id=segment_ids, bos_id=self.bos_id),
            "decoder_loss_weights": tf.cast(
                tf.maximum(features["loss_weights"] - 1, 0), tf.float32),
        }
        # Padding is fed padding, not the <eos> a new "segment" would start with.
        out["decoder_input_tokens"] *= tf.cast(features["targets"] != 0, tf.int32)
        if self.pack:
            out["decoder_segment_ids"] = segment_ids
            out["decoder_positions"] = features["targets_positions"]
        return out

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # seqio's packing treats every 0 as padding and squeezes it out, which
        # would shift the weights against the tokens: carry weight + 1 through
        # packing (padding stays 0) and subtract it again afterwards.
        ds = ds.map(lambda ex: {**ex, "loss_weights": ex["loss_weights"] + 1})
        ds = self._pack_or_pad(ds, task_feature_lengths)
        return ds.map(self._convert_example,
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> Mapping[str, int]:
        n = task_feature_lengths["targets"]
        names = list(self.MODEL_FEATURES)
        if self.pack:
            names += list(self.PACKING_FEATURE_DTYPES)
        return {k: n for k in names}
