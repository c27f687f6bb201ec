"""What the task tests share: a task's batches, and its seqio cache against its shards."""

from __future__ import annotations

import os
import subprocess
import sys

import gin
import seqio

from cm3leon_jax.train.feature_converter import CM3FeatureConverter
from cm3leon_jax.vocab.layout import EOS_ID


def batches(task: str, split: str = "train", seed: int = 3, pack: bool = True, *,
            seq_len: int) -> list[dict]:
    """One shuffled epoch of `task`, through the trainer's feature converter."""
    ds = seqio.get_dataset(
        task, task_feature_lengths={"targets": seq_len}, dataset_split=split,
        shuffle=True, seed=seed, num_epochs=1,
        feature_converter=CM3FeatureConverter(bos_id=EOS_ID, pack=pack))
    return list(ds.as_numpy_iterator())


def cached_and_fresh(task: str, env: dict[str, str], binding: tuple[str, str], cache_dir,
                     seq_len: int, split: str = "validation") -> tuple[list, list]:
    """Caches `task` with seqio's `cache_tasks_main` (a subprocess; `env` points the tasks
    at their data), then reads `split` from the cache and from the shards (gin `binding`
    = (key, data folder)). Returns both lists of `targets`, sorted."""
    r = subprocess.run(
        [sys.executable, "-m", "seqio.scripts.cache_tasks_main", "--module_import=tasks",
         f"--tasks={task}", f"--output_cache_dir={cache_dir}", "--min_shards=1"],
        env=dict(os.environ, PYTHONPATH=os.getcwd(), **env), capture_output=True, text=True,
        timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isdir(os.path.join(cache_dir, task))
    gin.clear_config()
    gin.bind_parameter(*binding)
    try:
        seqio.add_global_cache_dirs([str(cache_dir)])
        got = seqio.get_mixture_or_task(task)
        out = []
        for use_cached in (True, False):
            ds = got.get_dataset({"targets": seq_len}, split=split, use_cached=use_cached,
                                 shuffle=False, seed=1)
            out.append(sorted(tuple(x["targets"]) for x in ds.as_numpy_iterator()))
        return out[0], out[1]
    finally:
        gin.clear_config()
