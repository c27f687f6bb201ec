"""The trainer: mesh, sharded state, jitted step, optax, orbax, metrics.

    trainer.py      the `train` run mode and its loop
    step.py         train/eval steps (gradient accumulation, non-finite handling)
    state.py        TrainState created sharded by the logical-axis rules
    optimizer.py    AdamW, warm-up + cosine/linear decay, clipping
    data.py         seqio task -> global batches; iterator position in checkpoints
    checkpoints.py  orbax manager, corruption fallback, save on SIGTERM
    staging.py      write a folder completely or not at all (temp folder, then rename):
                    exports, imports and retrieval builds
    metrics.py      model FLOPs, MFU, peak table, TensorBoard/console writers
    distributed.py  jax.distributed start-up and the (ICI x DCN) mesh
"""
