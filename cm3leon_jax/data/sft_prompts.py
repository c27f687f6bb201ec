"""The SFT families' prompt templates: the one place that lays out a family's example,
for training (preprocessing) and for inference (the Generator) alike.

Every example is `instruction <break> inputs <break> output` (paper Table 5), trained
under the CM3 objective over the whole sequence:

    family                 segments before the output                       output
    edit                   Edit first image following the instruction       image
                           | {source image} | {instruction}
    <c>_to_image           Make high quality image from {c} features        image
      (edge, segmentation, | {condition image} | {caption}
       scribble, depth)
    boxes_to_image         Generate high quality image of {caption} with    image
                           segmentations {obj} at ({x0},{y0},{x1},{y1}), ...
    how_to_write           draw "{text}"                                    image
    caption                Describe the given picture. | {image}            text <eos>
    long_caption           Describe the given picture in detail. | {image}  text <eos>
    vqa                    {image} | Question: {question}                   text <eos>
    segment                segment {the X} | {image}                        mask image

(`|` is `<break>`.) The instruction texts are the paper's. The paper writes captions and
VQA answers before the image ("Describe the given picture. {caption} <break> {image}");
here every output comes last, so inference is one left-to-right prompt that ends in
`<break>`, and the CM3 objective still trains the other direction (a moved span is
predicted after the image). Text outputs end in `<eos>` so generation knows where to
stop; image outputs are always `image_length` codes.

VQA puts the question after the image, as editing puts its instruction after the source:
the answer then follows the words that say what to read. With the question first, 64
image codes stand between it and the answer, and the demo's 0.97M decoder answered color
questions with background words and the other way round (on 128 validation scenes over
three SFT seeds, VQA 33% against 47% with the image first, the color questions 17 of 81
right against 57; `benchmarks/RESULTS_sft.md`).

A segment is a `str`, an image (int codes[image_length] once tokenized; uint8 pixels
[h, w, 3] before), or `MASK`: a `<sentinel:i>` in place of a masked input (numbered in
order), which is how the unconditional streams of guidance are written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID

CONDITIONS = {"edge": "canny edge", "segmentation": "segmentation", "scribble": "scribble",
              "depth": "depth"}
CONDITION_FAMILIES = tuple(f"{c}_to_image" for c in CONDITIONS)
IMAGE_FAMILIES = ("edit", *CONDITION_FAMILIES, "boxes_to_image", "how_to_write", "segment")
TEXT_FAMILIES = ("caption", "long_caption", "vqa")
FAMILIES = IMAGE_FAMILIES + TEXT_FAMILIES


class _Mask:
    """A masked input: written as the next `<sentinel:i>`."""

    def __repr__(self) -> str:
        return "MASK"


MASK = _Mask()


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One family's segments before its output.

    segments: str | image | MASK, in order. text_inputs / image_inputs: indices of the
    segments that carry the example's text / image condition (what guidance masks).
    """

    family: str
    segments: tuple
    text_inputs: tuple[int, ...] = ()
    image_inputs: tuple[int, ...] = ()

    @property
    def output(self) -> str:
        """'image' or 'text'."""
        return "text" if self.family in TEXT_FAMILIES else "image"

    def images(self) -> list[Any]:
        return [s for s in self.segments if _is_image(s)]

    def map_images(self, fn: Callable[[Any], Any]) -> "Prompt":
        """The same prompt with every image segment replaced by `fn(image)`."""
        new = tuple(fn(s) if _is_image(s) else s for s in self.segments)
        return dataclasses.replace(self, segments=new)

    def masked(self, text: bool = False, image: bool = False) -> "Prompt":
        """The prompt with its text and/or image inputs replaced by MASK."""
        drop = set(self.text_inputs if text else ()) | set(self.image_inputs if image else ())
        new = tuple(MASK if i in drop else s for i, s in enumerate(self.segments))
        return dataclasses.replace(self, segments=new)


def _is_image(segment: Any) -> bool:
    return isinstance(segment, np.ndarray)


# -- the templates --------------------------------------------------------------------

def edit(source: Any, instruction: str) -> Prompt:
    return Prompt("edit", ("Edit first image following the instruction", source, instruction),
                  text_inputs=(2,), image_inputs=(1,))


def condition_to_image(condition: str, condition_image: Any, caption: str) -> Prompt:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; use one of {tuple(CONDITIONS)}.")
    return Prompt(f"{condition}_to_image",
                  (f"Make high quality image from {CONDITIONS[condition]} features",
                   condition_image, caption), text_inputs=(2,), image_inputs=(1,))


def boxes_to_image(caption: str, boxes: Sequence[str]) -> Prompt:
    """boxes: 'red circle at (x0,y0,x1,y1)' per object (`shapes_language.box_phrases`)."""
    text = f"Generate high quality image of {caption} with segmentations {', '.join(boxes)}"
    return Prompt("boxes_to_image", (text,), text_inputs=(0,))


def how_to_write(text: str) -> Prompt:
    return Prompt("how_to_write", (f'draw "{text}"',), text_inputs=(0,))


def caption(image: Any, long: bool = False) -> Prompt:
    if long:
        return Prompt("long_caption", ("Describe the given picture in detail.", image),
                      image_inputs=(1,))
    return Prompt("caption", ("Describe the given picture.", image), image_inputs=(1,))


def vqa(image: Any, question: str) -> Prompt:
    """The image, then the question: the answer follows the words it answers (module doc)."""
    return Prompt("vqa", (image, f"Question: {question}"), text_inputs=(1,), image_inputs=(0,))


def segment(image: Any, phrase: str) -> Prompt:
    """phrase: 'the red circle' (`shapes_language.refer`)."""
    return Prompt("segment", (f"segment {phrase}", image), text_inputs=(0,), image_inputs=(1,))


# -- ids --------------------------------------------------------------------------------

def segment_ids(prompt: Prompt, vocab) -> list[np.ndarray]:
    """Each segment's ids: text pieces, image ids (from codes), or one sentinel: the i-th
    masked input `<sentinel:i>`, or the last sentinel where the vocabulary has fewer (an
    imported Chameleon's one, its `<s>`, masks every input of a guidance stream)."""
    layout, out, masks = vocab.layout, [], 0
    for i, s in enumerate(prompt.segments):
        if s is MASK:
            out.append(np.array([layout.sentinel_id(min(masks, layout.num_sentinels - 1))],
                                np.int32))
            masks += 1
        elif isinstance(s, str):
            out.append(np.asarray(vocab.encode(s), np.int32))
        elif _is_image(s) and s.ndim == 1:
            if s.size != layout.image_length:
                raise ValueError(f"{prompt.family} prompt segment {i}: {s.size} image codes, "
                                 f"the vocabulary expects {layout.image_length}.")
            out.append(layout.codes_to_ids(s))
        else:
            raise ValueError(f"{prompt.family} prompt segment {i} is {type(s).__name__} "
                             f"{getattr(s, 'shape', '')}: images must be VQ-encoded to int "
                             "codes[image_length] before they become ids.")
    return out


def _join(parts: list[np.ndarray]) -> np.ndarray:
    out = []
    for p in parts:
        out += [p, np.array([BREAK_ID], np.int32)]
    return np.concatenate(out).astype(np.int32)


def prompt_ids(prompt: Prompt, vocab) -> np.ndarray:
    """int32[n]: `segments <break>`, what generation continues with the output."""
    return _join(segment_ids(prompt, vocab))


def output_ids(prompt: Prompt, output: Any, vocab) -> np.ndarray:
    """The output's ids: image ids, or text pieces then `<eos>`. A VQA answer is encoded
    as it reads after the question ("... Answer: red"), with its leading space: the text
    model keeps no dummy prefix, so a bare "red" would be three letters, not the piece."""
    if prompt.output == "text":
        if not isinstance(output, str) or not output.strip():
            raise ValueError(f"{prompt.family}: the output must be a non-empty text.")
        text = " " + output.strip() if prompt.family == "vqa" else output
        return np.concatenate([vocab.encode(text), [EOS_ID]]).astype(np.int32)
    output = np.asarray(output)
    if output.ndim != 1 or output.size != vocab.layout.image_length:
        raise ValueError(f"{prompt.family}: the output must be int codes"
                         f"[{vocab.layout.image_length}], got shape {output.shape}.")
    return vocab.layout.codes_to_ids(output)


def example_ids(prompt: Prompt, output: Any, vocab) -> np.ndarray:
    """int32[n]: the whole training example, `segments <break> output`."""
    return np.concatenate([prompt_ids(prompt, vocab), output_ids(prompt, output, vocab)])
