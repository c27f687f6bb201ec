"""cm3leon-jax: retrieval-augmented, token-based multimodal decoders in JAX.

One sub-package per stage of the flow (see README.md and docs/DESIGN.md). Imports
point down (tests/test_import_flow.py): model < train < vocab, retrieval < data <
decode < evaluation, export < tasks, main, sft < demo < testing; fs, errors, hostmem,
images and xla_flags at the base.
"""

__version__ = "0.1.0"
