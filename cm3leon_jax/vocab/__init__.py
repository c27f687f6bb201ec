"""Tokens: the text tokenizer, the image tokenizer and the unified id layout.

    layout.py          the unified vocabulary's id layout: the one source of truth
    multimodal.py      that vocabulary as a `seqio.Vocabulary`
    document.py        documents: ordered text and image segments, and their ids
    text_tokenizer.py  the text half: a SentencePiece model, trained here
    hf_text_tokenizer.py  a text tokenizer from a `tokenizers` file (Chameleon's)
    image_tokenizer.py the user-facing image tokenizer: images <-> codes
    image_inputs.py    whatever images a user passes -> uint8[b, s, s, 3]
    vqgan.py           the VQGAN network (encoder, quantizer, decoder)
    quantizer.py       the vector quantizer
    patch_discriminator.py  PatchGAN discriminator and hinge losses
    vqgan_train.py     the `train_image_tokenizer` run mode
    vqgan_checkpoint.py  its checkpoints (the shared checkpointer's layout, two items more)
    image_sources.py   image sources it trains on: random access, deterministic
    chameleon_vqgan_weights.py  the released VQGAN checkpoint layout, in and out
"""

from cm3leon_jax.vocab.document import Document, Image, Text
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer, load_image_tokenizer
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, PAD_ID, UNK_ID, IdLayout
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer
from cm3leon_jax.vocab.vqgan import VQGANConfig

__all__ = [
    "BREAK_ID",
    "EOSS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "Document",
    "IdLayout",
    "Image",
    "ImageTokenizer",
    "MultimodalVocabulary",
    "Text",
    "TextTokenizer",
    "VQGANConfig",
    "load_image_tokenizer",
]
