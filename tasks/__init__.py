"""SeqIO tasks and mixtures. `import tasks` registers them all.

    tasks.pretrain   retrieval-augmented CM3 pretraining on the built-in corpus,
                     the same without retrieval, their mixture, and the same
                     tasks over a user's own preprocessed data.
"""

from tasks import pretrain  # noqa: F401  (registers on import)
