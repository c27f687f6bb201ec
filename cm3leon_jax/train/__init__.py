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
    feature_converter.py  the packed decoder layout the trainer reads (seqio)

The run records every later stage reads (the lowest level that writes them, so data,
vocab and retrieval import them from here):

    run_config.py   the decoder a run trained, read back from its config.gin; export
                    manifests; a MODEL_DIR apart from the folders a run reads
    params_checkpoint.py  params-only checkpoints (exports): written, verified, restored
    vocab_record.py the vocabulary a run trained on (MODEL_DIR/vocabulary.json)
"""
