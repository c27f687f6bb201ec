"""Evaluation: image metrics, picture grids, and (later) FID, CLIP score, CIDEr."""
