"""A run mode that joins the JAX job and records what each process sees: launcher tests.

Each process calls `train/distributed.py`'s `initialize` (as the trainer does), then
all-gathers its process index across the job, and writes
`MODEL_DIR/process_<index>.json`: its index, the process count, the device counts,
the gathered indices, and the `tag` it was given (to check that overrides arrive).
"""

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from cm3leon_jax import fs
from cm3leon_jax.train import distributed


@gin.configurable
def processes_mode(model_dir: str, tag: str = "") -> dict:
    distributed.initialize()
    gathered = multihost_utils.process_allgather(np.array([jax.process_index()], np.int32))
    record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "devices": jax.device_count(),
              "gathered": np.asarray(gathered).ravel().tolist(), "tag": tag}
    fs.write_json(fs.join(model_dir, f"process_{jax.process_index()}.json"), record)
    return record
