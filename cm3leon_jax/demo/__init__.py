"""The main job: every run mode in turn on the built-in corpus (`make demo`).

    run.py       the `demo` run mode: the stages in order, their folders under MODEL_DIR,
                 which settings each reads first, the report (metrics.json); the short
                 stages (corpus, image tokenizer, retriever, pretrain, export, pictures)
    stages.py    running, timing and reusing a stage (a rerun resumes); per-stage
                 fingerprints of the settings
    apart.py     a stage in a process of its own (the tokenizer beside the retriever)
    finetune.py  the SFT shards of the corpus and the short SFT on the mixture
    generate.py  the generate stage: held-out captions -> images, images -> captions,
                 scored exactly, with their ablations
    evaluate.py  the evaluate stage: the eval run's exact metrics before and after SFT
    sheet.py     the contact sheet

`import cm3leon_jax.demo` (as gin_configs/runs/demo.gin does) registers the run mode.
"""

from cm3leon_jax.demo.run import demo

__all__ = ["demo"]
