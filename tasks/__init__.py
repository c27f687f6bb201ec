"""SeqIO tasks and mixtures. `import tasks` registers them all.

    tasks.pretrain   retrieval-augmented CM3 pretraining on the built-in corpus,
                     the same without retrieval, their mixture, and the same
                     tasks over a user's own preprocessed data.
    tasks.sft        one task per SFT family (edit, condition -> image, boxes,
                     how-to-write, captions, VQA, segmentation) and their mixtures.
"""

from tasks import pretrain, sft  # noqa: F401  (register on import)
