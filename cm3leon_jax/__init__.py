"""cm3leon-jax: retrieval-augmented, token-based multimodal decoders in JAX.

One sub-package per stage of the flow (see README.md and DESIGN.md):
vocab -> data -> retrieval -> tasks -> model/train -> decode -> evaluation -> export.
"""

__version__ = "0.1.0"
