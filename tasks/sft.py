"""SFT tasks: one per instruction family (paper Table 5), and their mixtures.

Each task reads `{sft_data_dirs.<corpus>}/{family}/{split}-*.tfrecord` (written by the
`sft_preprocess` mode, see `cm3leon_jax/data/sft_preprocess.py`), whose records are
whole `instruction <break> inputs <break> output` examples (`data/sft_prompts.py`),
applies the CM3 transform over the whole sequence (the pretraining preprocessor with no
retrieved documents) and yields `targets` + `loss_weights` for `CM3FeatureConverter`,
which packs them like pretraining. Seeds and caching work as for `tasks.pretrain`.

    task                                  family
    cm3leon_sft_<family>                  each of sft_prompts.FAMILIES, built-in corpus
    cm3leon_sft_user_<family>             the same over a user's SFT folder
    cm3leon_sft_mix                       every built-in family, rates from gin
                                          (`sft_mixture_rates.rates`)
    cm3leon_sft_user_mix                  every user family, the same rates
    cm3leon_sft_replay_mix                every built-in family, plus the pretraining
                                          documents (`cm3leon_synthetic`, retrieval-
                                          augmented) at `sft_replay.rate`
    cm3leon_sft_user_replay_mix           the same over a user's SFT folder and corpus
                                          (`cm3leon_user`)

The replay mixtures keep what pretraining taught: fine-tuned on the instruction families
alone, the demo's small decoder forgot how to caption in the pretraining layout (RESULTS_sft.md).

A mixture's dataset leaves out the families at rate 0 and those `sft_preprocess` wrote
no shards of for the split (a public-format source has no example of some families),
logging which; rates must be finite and one of what is left must be positive. A family
whose split has no example (none written), or whose longest examples do not fit the
training `seq_len` (`sft_preprocess.check_fits`: the length filter would drop them), is a
one-line `UserInputError` naming it when the dataset is built: an empty dataset would
otherwise be repeated forever, and a filtered one would lose examples without a word.
"""

from __future__ import annotations

import functools
import math
import os

import gin
import seqio
import tensorflow as tf
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.data import seqio_augment, sft_preprocess, shards
from cm3leon_jax.data.sft_prompts import FAMILIES
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab.layout import BREAK_ID
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from tasks import pretrain  # noqa: F401  (the replay mixtures name its tasks)

SPLITS = ("train", "validation", "test")
# Image-output families come first in the paper's list; defaults weigh every family
# equally except the four condition kinds, which share one "condition -> image" slot.
DEFAULT_RATES = {f: (0.25 if f.endswith("_to_image") and f != "boxes_to_image" else 1.0)
                 for f in FAMILIES}


@gin.configurable
def sft_data_dirs(synthetic: str = os.environ.get("CM3LEON_SFT_DATA_DIR",
                                                  "runs/demo/sft_data"),
                  user: str | None = None) -> dict[str, str | None]:
    """Where the SFT shards live (bind in gin: `sft_data_dirs.user = '...'`)."""
    return {"synthetic": synthetic, "user": user}


@gin.configurable
def sft_mixture_rates(rates: dict | None = None) -> dict[str, float]:
    """Mixing rate of each family (examples drawn in proportion); unnamed ones keep
    DEFAULT_RATES."""
    out = dict(DEFAULT_RATES)
    for family, rate in (rates or {}).items():
        if family not in out:
            raise UserInputError(f"sft_mixture_rates.rates names {family!r}; the families are "
                                 f"{FAMILIES}.")
        if not _is_rate(rate):
            raise UserInputError(f"sft_mixture_rates.rates[{family!r}]={rate!r}; rates are "
                                 "finite numbers >= 0.")
        out[family] = float(rate)
    return out


def _is_rate(rate) -> bool:
    """A finite number >= 0 (NaN passes `rate < 0`, and an infinite one cannot be mixed)."""
    return (isinstance(rate, (int, float)) and not isinstance(rate, bool)
            and math.isfinite(rate) and rate >= 0)


@gin.configurable
def sft_replay(rate: float = 1.0) -> float:
    """Mixing rate of the pretraining documents in the replay mixtures, on the scale of
    `sft_mixture_rates` (each family 1 by default)."""
    if not _is_rate(rate):
        raise UserInputError(f"sft_replay.rate={rate!r}; rates are finite numbers >= 0.")
    return float(rate)


@gin.configurable
def sft_cm3(mean_spans: float = 1.0, loss_on: str = "all") -> dict:
    """How SFT examples are trained.

    mean_spans: Poisson mean of CM3's masked spans (1, the paper's, as in pretraining; 0:
      plain left to right, the output always in place after its prompt).
    loss_on: "all" (the paper: the loss over the whole sequence) or "output" (only the
      tokens after the example's last `<break>`, its output; needs mean_spans = 0, since
      CM3 moves spans across that boundary).
    """
    if mean_spans < 0 or loss_on not in ("all", "output") or (loss_on == "output"
                                                              and mean_spans != 0):
        raise UserInputError(f"sft_cm3.mean_spans={mean_spans}, sft_cm3.loss_on={loss_on!r}; "
                             "use a mean >= 0 and loss_on 'all', or 'output' with mean_spans 0.")
    return {"mean_spans": float(mean_spans), "loss_on": loss_on}


def _augment(dataset, output_features, sequence_length=None, *, check_fits):
    """The pretraining preprocessor with no retrieved documents and `sft_cm3`'s spans;
    with `loss_on = "output"` the loss weights end up on the output tokens only."""
    how = sft_cm3()
    dataset = seqio_augment.retrieval_augment(
            dataset, output_features, sequence_length, k_probs=(1.0,),
            check_fits=check_fits, mean_spans=how["mean_spans"])
    if how["loss_on"] == "all":
        return dataset

    def output_only(ex):
        targets = ex["targets"]
        last_break = tf.reduce_max(tf.where(tf.equal(targets, BREAK_ID))[:, 0])
        after = tf.range(tf.size(targets, out_type=tf.int64)) > last_break
        return {**ex, "loss_weights": ex["loss_weights"] * tf.cast(after, tf.int32)}

    return dataset.map(output_only, num_parallel_calls=tf.data.AUTOTUNE)


def _data_dir(corpus: str) -> str:
    directory = sft_data_dirs()[corpus]
    if not directory:
        raise UserInputError(f"no SFT data folder for the {corpus!r} corpus: bind "
                             f"`sft_data_dirs.{corpus} = '/path/to/sft_data'` in gin (the output "
                             "folder of the sft_preprocess mode).")
    return directory


def _read(split: str, shuffle_files: bool, seed: int | None = None, *, corpus: str,
          family: str):
    del shuffle_files, seed  # Shard order is fixed; seqio shuffles examples.
    sft_preprocess.check_has_examples(_data_dir(corpus), family, split)
    return shards.read_split(os.path.join(_data_dir(corpus), family), split,
                             made_by="sft_preprocess")


def _check_fits(config, *, corpus: str, family: str) -> None:
    sft_preprocess.check_fits(config, data_dir=_data_dir(corpus), family=family)


def _rate(task: seqio.Task, family: str) -> float:
    del task
    return sft_mixture_rates()[family]


def _replay_rate(task: seqio.Task) -> float:
    del task
    return sft_replay()


class FamilyMixture(seqio.Mixture):
    """A mixture of SFT family tasks (and, for replay, the pretraining task) whose dataset
    leaves out the families at rate 0 and those without shards for the split, logging
    which: seqio opens every task of a mixture, and a family no adapter of a public-format
    source writes (segment, how_to_write, ...) has no folder. What is left must have a
    positive rate (all zero: no dataset to draw from)."""

    def __init__(self, name, tasks, corpus: str, families: dict[str, str], **kwargs):
        super().__init__(name, tasks, **kwargs)
        self._corpus = corpus
        self._families = families  # task name -> family

    def get_dataset(self, sequence_length=None, split="train", **kwargs) -> tf.data.Dataset:
        data_dir = _data_dir(self._corpus)
        kept, zero, missing = [], [], []
        for task in self.tasks:
            family = self._families.get(task.name)
            if self.get_rate(task) == 0:
                zero.append(family or task.name)
            elif family is not None and not fs.glob(
                    shards.shard_pattern(os.path.join(data_dir, family), split)):
                missing.append(family)
            else:
                kept.append((task, self.rate_per_task_name[task.name]))
        if zero or missing:
            logging.warning("%s (%s split) leaves out %s at rate 0 and %s without shards in %s",
                            self.name, split, zero or "none", missing or "none", data_dir)
        if not kept:
            raise UserInputError(
                f"{self.name} has nothing to draw from for the {split!r} split: families at "
                f"rate 0: {zero or 'none'}; without shards in {data_dir!r}: "
                f"{missing or 'none'}. Give a family with shards a positive rate "
                "(sft_mixture_rates.rates), or run sft_preprocess for it.")
        return seqio.Mixture(self.name, kept, sample_fn=self._sample_fn).get_dataset(
            sequence_length, split, **kwargs)


def _register(prefix: str, corpus: str, pretraining_task: str) -> None:
    vocab = MultimodalVocabulary(lambda: os.path.join(_data_dir(corpus), "vocab"))
    for family in FAMILIES:
        no_retrieval = functools.partial(
            _augment, check_fits=functools.partial(_check_fits, corpus=corpus, family=family))
        seqio.TaskRegistry.add(
            f"{prefix}_{family}",
            source=seqio.FunctionDataSource(
                dataset_fn=functools.partial(_read, corpus=corpus, family=family),
                splits=SPLITS),
            preprocessors=[seqio.CacheDatasetPlaceholder(), no_retrieval],
            output_features={
                "targets": seqio.Feature(vocab, add_eos=False, dtype="int32"),
                "loss_weights": seqio.Feature(seqio.PassThroughVocabulary(2),
                                              add_eos=False, dtype="int32"),
            },
        )
    families = [(f"{prefix}_{f}", functools.partial(_rate, family=f)) for f in FAMILIES]
    family_of = {f"{prefix}_{f}": f for f in FAMILIES}
    seqio.MixtureRegistry.add(f"{prefix}_mix", families, mixture_cls=FamilyMixture,
                              corpus=corpus, families=family_of)
    seqio.MixtureRegistry.add(f"{prefix}_replay_mix",
                              families + [(pretraining_task, _replay_rate)],
                              mixture_cls=FamilyMixture, corpus=corpus, families=family_of)


_register("cm3leon_sft", "synthetic", "cm3leon_synthetic")
_register("cm3leon_sft_user", "user", "cm3leon_user")
