"""Pretraining tasks: retrieval-augmented CM3 over tokenized shards.

Each task reads `{data_dir}/{split}-*.tfrecord` (written by the `preprocess`
mode, see `cm3leon_jax/data/shards.py`) with the vocabulary in
`{data_dir}/vocab`, builds `retrieved <eos> ... query` examples, applies the
CM3 transform, and yields `targets` + `loss_weights` for
`CM3FeatureConverter`. Data folders come from gin (`data_dirs.*`) and are read
only when a dataset is requested, so importing this module needs no data.
A query document longer than the training `seq_len` allows is refused when the dataset
is built (`preprocess.check_fits`), not dropped by the length filter without a word (or,
when none fits, left to an empty dataset that seqio repeats forever).

    task                              data            neighbors used
    cm3leon_synthetic                 built-in        k ~ retrieval_augment.k_probs
    cm3leon_synthetic_no_retrieval    built-in        none (plain CM3)
    cm3leon_synthetic_mix             both, 3:1
    cm3leon_user                      a user's own    k ~ retrieval_augment.k_probs
    cm3leon_user_no_retrieval         a user's own    none
"""

from __future__ import annotations

import functools
import os

import gin
import seqio

from cm3leon_jax import fs
from cm3leon_jax.data import preprocess, seqio_augment, shards
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

SPLITS = ("train", "validation", "test")


@gin.configurable
def data_dirs(synthetic: str = os.environ.get("CM3LEON_DATA_DIR", "runs/demo/data"),
              user: str | None = None) -> dict[str, str | None]:
    """Where the tokenized corpora live (bind in gin: `data_dirs.user = '...'`)."""
    return {"synthetic": synthetic, "user": user}


def _data_dir(corpus: str) -> str:
    directory = data_dirs()[corpus]
    if not directory:
        raise UserInputError(
            f"no data folder for the {corpus!r} corpus: bind "
            f"`data_dirs.{corpus} = '/path/to/tokenized'` in gin (the output "
            "folder of the preprocess mode).")
    if not fs.isdir(directory):
        raise MissingInputError(
            f"data_dirs.{corpus} = {directory!r} does not exist: run the preprocess mode "
            f"(gin_configs/runs/{'preprocess_user.gin' if corpus == 'user' else 'preprocess.gin'})"
            f" to write it, or bind data_dirs.{corpus} to the MODEL_DIR of a preprocess run.")
    return directory


def _read(split: str, shuffle_files: bool, seed: int | None = None, *, corpus: str):
    del shuffle_files, seed  # Shard order is fixed; seqio shuffles examples.
    return shards.read_split(_data_dir(corpus), split)


def _check_fits(config, *, corpus: str) -> None:
    preprocess.check_fits(config, _data_dir(corpus))


def _register(name: str, corpus: str, retrieval: bool) -> None:
    vocab = MultimodalVocabulary(lambda: os.path.join(_data_dir(corpus), "vocab"))
    augment = functools.partial(seqio_augment.retrieval_augment,
                                check_fits=functools.partial(_check_fits, corpus=corpus))
    if not retrieval:
        augment = functools.partial(augment, k_probs=(1.0,))
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            dataset_fn=functools.partial(_read, corpus=corpus), splits=SPLITS),
        # Caching (seqio.scripts.cache_tasks_main) stores the parsed records;
        # the random part, augment, runs after it on every epoch.
        preprocessors=[seqio.CacheDatasetPlaceholder(), augment],
        output_features={
            "targets": seqio.Feature(vocab, add_eos=False, dtype="int32"),
            "loss_weights": seqio.Feature(seqio.PassThroughVocabulary(2),
                                          add_eos=False, dtype="int32"),
        },
    )


for _corpus, _prefix in (("synthetic", "cm3leon_synthetic"), ("user", "cm3leon_user")):
    _register(_prefix, _corpus, retrieval=True)
    _register(f"{_prefix}_no_retrieval", _corpus, retrieval=False)

seqio.MixtureRegistry.add(
    "cm3leon_synthetic_mix",
    [("cm3leon_synthetic", 3.0), ("cm3leon_synthetic_no_retrieval", 1.0)])
