"""Evaluation: picture grids, exact scores of generations on synthetic scenes
(shapes_scores.py), and (later) FID, CLIP score, CIDEr."""
