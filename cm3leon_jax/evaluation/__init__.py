"""Evaluation: the metrics, and the `eval` run mode that decodes a suite and grades it.

    eval_run.py       the `eval` run mode: a suite decoded by strategies, report.md / .json
    suites.py         what a run decodes: the built-in corpus, COCO, a folder of conditions
    grading.py        each task decoded with one strategy and graded: the report's rows
    fid.py            Frechet distance, cached reference statistics
    inception.py      the FID Inception network in Flax (pytorch-fid's features)
    inception_weights.py  pytorch-fid's weights file -> its variables
    clip_score.py     100 * max(cos(image, text), 0)
    captioning.py     BLEU, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap
    vqa.py            VQAv2 accuracy with the official answer normalization
    shapes_scores.py  exact scores of images and captions against the corpus' scenes
    sft_families.py   exact per-family scores of SFT generations on the corpus
    likelihood.py     log p(target | prompt): which prompt explains a target best
"""
