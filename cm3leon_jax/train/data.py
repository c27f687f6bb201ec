"""SeqIO task -> global batches of `jax.Array`s, with the iterator's position checkpointed.

The data stream is cut into `num_data_shards` *data shards* that do not depend on how
many hosts there are: shard `s` is `seqio.get_dataset(..., shard_info=ShardInfo(s, S))`
batched to `global_batch / S` rows, and it fills rows `[s * B/S, (s+1) * B/S)` of every
global batch. A host reads exactly the shards whose rows its devices hold, so

  * one process with 2 devices and 2 processes with 1 device each see the same global
    batches (the multi-host test relies on it), and
  * a checkpoint (one `tf.train.Checkpoint` of each shard's iterator, prefetch buffers
    and shuffle state included) restores onto any number of hosts, as long as
    `num_data_shards` and the batch are unchanged.

Keep `num_data_shards` fixed for the life of a run (it defaults to the number of
processes, which is right for a run that never changes topology).

Each shard draws from its own seed, `shard_seed(seed, shard)` (shuffling, mixture sampling
and every random preprocessor's per-example seeds): on one seed, row j of every shard
would get the same augmentation decisions. Shard 0 keeps the run's seed, so a one-shard
run reads what it read before shards had their own seeds; a position saved before then
(its `data_spec.json` lacks "shard_seeds") resumes with every shard on the run's seed, as
it was trained.

    ┌──────────── global batch [B, L] ────────────┐
    │ shard 0: rows 0 .. B/S-1      (host 0 reads)│
    │ shard 1: rows B/S .. 2B/S-1   (host 1 reads)│
    │ ...                                         │
    └─────────────────────────────────────────────┘
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import NamedSharding

from cm3leon_jax import fs
from cm3leon_jax.errors import CheckpointMismatchError, UserInputError
from cm3leon_jax.train.feature_converter import CM3FeatureConverter

# The data pipeline must never take an accelerator (or its memory) from JAX.
tf.config.set_visible_devices([], "GPU")

# `make_dataset(shard, num_shards, rows)`, plus `seed=` the shard's seed when
# `ShardedBatches` is given the run's seed.
ShardDatasetFn = Callable[..., tf.data.Dataset]
_SPEC_FILE = "data_spec.json"
_SEED_STRIDE = 0x9E3779B1  # 2**32 / golden ratio: shards' seeds spread evenly mod 2**31.

log = logging.getLogger(__name__)


def shard_seed(seed: int, shard: int) -> int:
    """Data shard `shard`'s seed in a run seeded `seed`: `seed` itself for shard 0, else
    `(seed + shard * 0x9E3779B1) mod 2**31`. Far apart (over 300k for 4096 shards, mod
    2**31), because seqio hands the consecutive seeds after a pipeline's seed to its random
    preprocessors."""
    return seed if shard == 0 else (seed + shard * _SEED_STRIDE) % 2**31


def opening_id(vocabulary: seqio.Vocabulary) -> int:
    """The token every training sequence opens with, the one its prompts open with too
    (`decode/prompts.opened`): the vocabulary's `prompt_start_id` (`<eos>` for ours;
    Chameleon's `<s>` for an imported Chameleon vocabulary, so fine-tuning it sees its own
    pretraining's first token); a vocabulary of another kind (seqio's), its `eos_id`."""
    return getattr(vocabulary, "prompt_start_id", vocabulary.eos_id)


@gin.configurable
def seqio_shard_dataset(shard: int, num_shards: int, rows: int, *, task: str,
                        seq_len: int, split: str = "train", seed: int = 0,
                        shuffle: bool = True, pack: bool = True, use_cached: bool = False,
                        num_epochs: int | None = None, autotune: bool = True
                        ) -> tf.data.Dataset:
    """Data shard `shard` of `num_shards` of a seqio task or mixture, batched to `rows`.

    `task`/`seq_len` come from the trainer (`train.task`, `train.seq_len`); bind the
    rest here (e.g. `seqio_shard_dataset.use_cached = True` after caching a task).
    Inputs start with the token the task vocabulary opens prompts with (`opening_id`).

    `autotune=False` runs the pipeline without tf.data's autotuner: its `AUTOTUNE`
    parallelism stays at tf.data's default (the host's cores, at most 16) and prefetch
    buffers grow only when the consumer waits. For short runs: with the autotuner, the
    iterator's destructor waits for the autotuner's thread to wake from a sleep that grows
    to a minute (TF 2.20), so a run that takes minutes can end with a minute of nothing.
    """
    vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    ds = seqio.get_dataset(
        task, task_feature_lengths={"targets": seq_len}, dataset_split=split,
        shuffle=shuffle, seed=seed, num_epochs=num_epochs, use_cached=use_cached,
        shard_info=seqio.ShardInfo(shard, num_shards),
        feature_converter=CM3FeatureConverter(bos_id=opening_id(vocabulary), pack=pack))
    ds = ds.batch(rows, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    return ds


class ShardedBatches(Iterator[dict[str, jax.Array]]):
    """Iterates global batches `{feature: Array[B, L]}` laid out by `sharding`."""

    def __init__(self, make_dataset: ShardDatasetFn, global_batch: int, seq_len: int,
                 sharding: NamedSharding, num_data_shards: int | None = None,
                 seed: int | None = None):
        """`seed`: the run's; recorded with the position (the order it continues was drawn
        by it) and handed to `make_dataset` as each shard's `shard_seed`. Without it
        `make_dataset` seeds its shards itself."""
        self.seed = seed
        self.num_shards = num_data_shards or jax.process_count()
        if global_batch % self.num_shards:
            raise ValueError(f"global batch {global_batch} does not split into "
                             f"num_data_shards={self.num_shards}; pick a divisor.")
        self.global_shape = (global_batch, seq_len)
        self.rows = global_batch // self.num_shards
        self.sharding = sharding
        # Which processes hold rows of which shard (from every device, not just ours).
        readers: dict[int, set[int]] = {}
        for device, index in sharding.devices_indices_map(self.global_shape).items():
            for s in self._shards_of(index[0]):
                readers.setdefault(s, set()).add(device.process_index)
        me = jax.process_index()
        self.local_shards = sorted(s for s, procs in readers.items() if me in procs)
        # One process writes each shard's iterator state (the others hold the same).
        self.owned_shards = [s for s in self.local_shards if min(readers[s]) == me]
        self._make_dataset = make_dataset
        self._build(own_seeds=seed is not None)

    def _build(self, own_seeds: bool) -> None:
        """Builds the local pipelines, at their first batch: each shard on its own seed, or
        (`own_seeds=False`, for positions saved before shards had their own) all on `seed`."""
        self.own_seeds = own_seeds
        seeds = {s: {} if self.seed is None else
                 {"seed": shard_seed(self.seed, s) if own_seeds else self.seed}
                 for s in self.local_shards}
        self._datasets = {s: self._make_dataset(s, self.num_shards, self.rows, **seeds[s])
                          for s in self.local_shards}
        self._iterators = {s: iter(ds) for s, ds in self._datasets.items()}

    def _use_seeds(self, own_seeds: bool) -> bool:
        """Rebuilds the pipelines if `own_seeds` changes their seeds; whether it did."""
        rebuild = own_seeds != self.own_seeds and self.num_shards > 1  # 1 shard: `seed` both.
        self.own_seeds = own_seeds
        if rebuild:
            self._build(own_seeds)
        return rebuild

    def restart(self) -> None:
        """Back to the first batch (cheap: the pipelines are built once, in __init__, and
        again only if a restore had put them on the old seeds)."""
        if not self._use_seeds(self.seed is not None):
            self._iterators = {s: iter(ds) for s, ds in self._datasets.items()}

    def close(self) -> None:
        """Frees the tf.data pipelines now. Left to the interpreter's exit (after an error
        in the first step), their destructors can wait forever on threads already gone."""
        self._iterators, self._datasets = {}, {}

    def _shards_of(self, rows: slice) -> range:
        start, stop, _ = rows.indices(self.global_shape[0])
        return range(start // self.rows, (stop - 1) // self.rows + 1)

    def next_local(self) -> dict[int, dict[str, np.ndarray]]:
        """The next batch of every shard this host reads, as numpy."""
        return {s: {k: v.numpy() for k, v in next(it).items()}
                for s, it in self._iterators.items()}

    def __next__(self) -> dict[str, jax.Array]:
        local = self.next_local()
        features = next(iter(local.values())).keys()
        return {k: self._global_array(local, k) for k in features}

    def _global_array(self, local: Mapping[int, Mapping[str, np.ndarray]], key: str) -> jax.Array:
        def rows(index):
            start, stop, _ = index[0].indices(self.global_shape[0])
            parts = []
            for s in self._shards_of(slice(start, stop)):
                lo, hi = max(start, s * self.rows), min(stop, (s + 1) * self.rows)
                parts.append(local[s][key][lo - s * self.rows:hi - s * self.rows])
            out = np.concatenate(parts) if len(parts) > 1 else parts[0]
            return out[(slice(None),) + tuple(index[1:])]
        sample = local[self.local_shards[0]][key]
        return jax.make_array_from_callback(self.global_shape, self.sharding, rows,
                                            dtype=sample.dtype)

    # Checkpointing (called by `checkpoints.DataIteratorHandler`).
    def spec(self) -> dict[str, Any]:
        # Whether the pipelines run tf.data's autotuner: it rewrites the graph the iterator
        # state is saved against, so a checkpoint restores only into the same setting.
        autotune = any(ds.options().autotune.enabled is not False
                       for ds in self._datasets.values())
        out = {"num_data_shards": self.num_shards, "global_batch": self.global_shape[0],
               "seq_len": self.global_shape[1], "autotune": autotune}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.own_seeds:
            out["shard_seeds"] = True  # Absent: every shard on `seed` (older positions).
        return out

    def _prefix(self, directory: str, shard: int) -> str:
        return os.path.join(directory, f"shard_{shard:05d}-of-{self.num_shards:05d}")

    def save(self, directory: str) -> None:
        """Writes this host's share of the iterators' state under `directory`."""
        fs.makedirs(directory)
        if jax.process_index() == 0:
            with fs.open(os.path.join(directory, _SPEC_FILE), "w") as f:
                f.write(json.dumps(self.spec()))
        for s in self.owned_shards:
            tf.train.Checkpoint(iterator=self._iterators[s]).write(self._prefix(directory, s))

    def _saved_spec(self, directory: str) -> dict[str, Any]:
        spec_path = os.path.join(directory, _SPEC_FILE)
        if not fs.exists(spec_path):  # E.g. an image tokenizer's record of its batches.
            raise CheckpointMismatchError(
                f"{directory} holds no data position of this trainer ({_SPEC_FILE} is "
                "missing): another kind of run wrote it (an image tokenizer's or a "
                "retriever's MODEL_DIR?). Give this run its own MODEL_DIR; the checkpoints "
                "were left untouched.")
        with fs.open(spec_path) as f:
            saved = {"autotune": True, **json.loads(f.read())}  # Older runs: the default.
        saved.setdefault("seed", self.seed)  # Runs before 6 Dec did not record it.
        return saved

    def layout_difference(self, directory: str) -> str | None:
        """How the layout saved under `directory` differs from this one (None: it fits).
        Whether the shards had their own seeds is none: `restore` follows the checkpoint."""
        saved, current = self._saved_spec(directory), self.spec()
        diff = [f"{k} {saved.get(k)} in the checkpoint, {current.get(k)} now"
                for k in sorted((set(saved) | set(current)) - {"shard_seeds"})
                if saved.get(k) != current.get(k)]
        return ", ".join(diff) or None

    def restore(self, directory: str) -> None:
        """Moves every local iterator to the position saved under `directory`, on the seeds
        it was drawn with."""
        difference = self.layout_difference(directory)
        if difference:
            raise ValueError(f"the checkpoint's data layout differs from this run's "
                             f"({difference}): keep train.global_batch_size, train.seq_len, "
                             "train.num_data_shards, train.seed and "
                             "seqio_shard_dataset.autotune as they were when the run started.")
        own_seeds = self.seed is not None and bool(
            self._saved_spec(directory).get("shard_seeds"))
        if self._use_seeds(own_seeds) and not own_seeds:
            log.warning("The data position in %s was saved before data shards had their own "
                        "seeds: its %d shards continue on seed %s each, as they were trained "
                        "(with the same augmentation draws in every shard). A run started "
                        "anew gives each shard its own seed.", directory, self.num_shards,
                        self.seed)
        for s in self.local_shards:
            try:
                tf.train.Checkpoint(iterator=self._iterators[s]).read(
                    self._prefix(directory, s)).assert_consumed()
            except tf.errors.OpError as e:
                raise UserInputError(
                    f"the data position saved in {directory} does not fit this run's input "
                    f"pipeline (tf.data: {e.message.splitlines()[0][:200]}): the task, its "
                    "preprocessing or seqio_shard_dataset's settings changed since the run "
                    "started. Resume with the settings it started with, or train into a new "
                    "MODEL_DIR.") from None
