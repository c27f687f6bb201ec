"""Evaluation: FID (Flax FID-Inception with pytorch-fid's weights; fid.py), CLIP score,
captioning metrics (pycocoevalcap), VQAv2 accuracy, exact scores on the built-in corpus
(shapes_scores.py), and the `eval` run mode (eval_run.py, suites.py)."""
