"""Tokens: the text tokenizer, the image tokenizer and the unified id layout."""

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
