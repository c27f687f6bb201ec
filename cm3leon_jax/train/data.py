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

    ┌──────────── global batch [B, L] ────────────┐
    │ shard 0: rows 0 .. B/S-1      (host 0 reads)│
    │ shard 1: rows B/S .. 2B/S-1   (host 1 reads)│
    │ ...                                         │
    └─────────────────────────────────────────────┘
"""

from __future__ import annotations

import json
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

ShardDatasetFn = Callable[[int, int, int], tf.data.Dataset]
_SPEC_FILE = "data_spec.json"


@gin.configurable
def seqio_shard_dataset(shard: int, num_shards: int, rows: int, *, task: str,
                        seq_len: int, split: str = "train", seed: int = 0,
                        shuffle: bool = True, pack: bool = True, use_cached: bool = False,
                        num_epochs: int | None = None, autotune: bool = True
                        ) -> tf.data.Dataset:
    """Data shard `shard` of `num_shards` of a seqio task or mixture, batched to `rows`.

    `task`/`seq_len` come from the trainer (`train.task`, `train.seq_len`); bind the
    rest here (e.g. `seqio_shard_dataset.use_cached = True` after caching a task).
    Inputs start with the task vocabulary's `eos_id` (see `feature_converter.py`).

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
        feature_converter=CM3FeatureConverter(bos_id=vocabulary.eos_id, pack=pack))
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
        self.seed = seed  # Recorded with the position: the order it continues was drawn by it.
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
        self._datasets = {s: make_dataset(s, self.num_shards, self.rows)
                          for s in self.local_shards}
        self.restart()

    def restart(self) -> None:
        """Back to the first batch (cheap: the pipelines are built once, in __init__)."""
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

    def layout_difference(self, directory: str) -> str | None:
        """How the layout saved under `directory` differs from this one (None: it fits)."""
        spec_path = os.path.join(directory, _SPEC_FILE)
        if not fs.exists(spec_path):  # E.g. an image tokenizer's record of its batches.
            raise CheckpointMismatchError(
                f"{directory} holds no data position of this trainer ({_SPEC_FILE} is "
                "missing): another kind of run wrote it (an image tokenizer's or a "
                "retriever's MODEL_DIR?). Give this run its own MODEL_DIR; the checkpoints "
                "were left untouched.")
        with fs.open(spec_path) as f:
            saved = {"autotune": True, **json.loads(f.read())}  # Older runs: the default.
        current = self.spec()
        saved.setdefault("seed", current.get("seed"))  # Runs before 6 Dec did not record it.
        diff = [f"{k} {saved.get(k)} in the checkpoint, {current.get(k)} now"
                for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        return ", ".join(diff) or None

    def restore(self, directory: str) -> None:
        """Moves every local iterator to the position saved under `directory`."""
        difference = self.layout_difference(directory)
        if difference:
            raise ValueError(f"the checkpoint's data layout differs from this run's "
                             f"({difference}): keep train.global_batch_size, train.seq_len, "
                             "train.num_data_shards, train.seed and "
                             "seqio_shard_dataset.autotune as they were when the run started.")
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
