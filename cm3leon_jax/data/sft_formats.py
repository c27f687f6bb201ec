"""Public-format adapters: files in a dataset's own layout -> SFT examples.

    source = FormatSource({"train": [InstructPix2PixJsonl("edits.jsonl"),
                                     CocoCaptions("captions_train2017.json", "train2017/")]})
    sft_preprocess(..., source=source)       # the same shards as the built-in corpus

    adapter                family             files
    InstructPix2PixJsonl   edit               JSONL: original_image, edit_prompt,
                                              edited_image (paths relative to the file)
    CocoCaptions           caption            captions_*.json + image folder
    Vqa2                   vqa                v2_*_questions.json + v2_*_annotations.json
                                              + COCO image folder (`image_pattern`)
    CocoInstances          boxes_to_image     instances_*.json + image folder
    ConditionFolder        <c>_to_image       image/NAME.*, <c>/NAME.* (c in CONDITIONS),
                                              caption/NAME.txt

Every record becomes an example or a `Skipped(doc_id, reason)`; the reasons
(missing_field, empty_text, unknown_image_id, missing_image, corrupt_image, no_boxes,
...) are counted per family and split in the SFT manifest, with sample ids, and a file
that cannot be read at all is one clear error. Nothing is dropped silently.

Boxes follow the image into the model's frame: `image_inputs` center-crops a
non-square image to a square and resizes it to `image_size`, so each COCO box
(x, y, w, h) is cropped and scaled the same way (pixels, ends exclusive); boxes
cut away entirely are counted as `box_outside_crop`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.data.sft_examples import SftExample
from cm3leon_jax.data.sft_preprocess import Skipped
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.vocab import image_inputs


@dataclasses.dataclass(frozen=True)
class Record:
    """One example still on disk: `build()` loads it (may raise `_Skip`)."""

    doc_id: str
    family: str
    build: Callable[[], SftExample] | None = None
    skipped: str | None = None  # a reason known without loading


class _Skip(Exception):  # noqa: N818
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_json(path: str, what: str) -> Any:
    if not fs.exists(path):
        raise MissingInputError(f"{what} {path!r} does not exist.")
    try:
        with fs.open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{what} {path!r} is not valid JSON ({e.msg}, line {e.lineno}); "
                             "give the file as the dataset publishes it.") from None


def load_image(path: str) -> np.ndarray:
    """uint8[h, w, 3], or `_Skip('missing_image' | 'corrupt_image')`."""
    try:
        return image_inputs.read_rgb(path)
    except FileNotFoundError:
        raise _Skip("missing_image") from None
    except ValueError:
        raise _Skip("corrupt_image") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Skip("missing_field")
    if not value.strip():
        raise _Skip("empty_text")
    return value.strip()


# -- InstructPix2Pix ------------------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class InstructPix2PixJsonl:
    """Edit triplets, one JSON a line: {"original_image", "edit_prompt", "edited_image"}
    (`input_image` / `instruction` / `output_image` are accepted too)."""

    path: str

    def records(self) -> list[Record]:
        if not fs.exists(self.path):
            raise MissingInputError(f"InstructPix2Pix file {self.path!r} does not exist.")
        root, out = os.path.dirname(fs.abspath(self.path)), []
        for n, row in fs.read_jsonl(self.path):
            doc_id = f"ip2p:{os.path.basename(self.path)}:{n}"
            if isinstance(row, json.JSONDecodeError):
                out.append(Record(doc_id, "edit", skipped="bad_json"))
            else:
                out.append(Record(doc_id, "edit", build=_ip2p_builder(row, root, doc_id)))
        return out


def _first(row: dict, *names: str) -> Any:
    return next((row[n] for n in names if isinstance(row, dict) and n in row), None)


def _ip2p_builder(row: dict, root: str, doc_id: str) -> Callable[[], SftExample]:
    def build():
        source = _first(row, "original_image", "input_image")
        target = _first(row, "edited_image", "output_image")
        instruction = _text(_first(row, "edit_prompt", "instruction"))
        if not isinstance(source, str) or not isinstance(target, str):
            raise _Skip("missing_field")
        before = load_image(os.path.join(root, source))
        after = load_image(os.path.join(root, target))
        return SftExample(doc_id, sft_prompts.edit(before, instruction), after,
                          {"instruction": instruction})
    return build


# -- COCO captions and instances ------------------------------------------------------------

def _coco_images(data: Any, path: str) -> dict[int, dict]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserInputError(f"{path!r} is not a COCO annotation file (it needs 'images' and "
                             "'annotations' lists).")
    return {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CocoCaptions:
    """captions_*.json (+ `image_dir`): one caption example per annotation; `long=True`
    files them under long_caption (Localized Narratives in the same layout)."""

    annotations: str
    image_dir: str
    long: bool = False

    def records(self) -> list[Record]:
        data = _read_json(self.annotations, "COCO captions file")
        images = _coco_images(data, self.annotations)
        family = "long_caption" if self.long else "caption"
        out = []
        for ann in data["annotations"]:
            doc_id = f"coco_caption:{ann.get('id', len(out))}"
            image = images.get(ann.get("image_id"))
            if image is None:
                out.append(Record(doc_id, family, skipped="unknown_image_id"))
                continue
            out.append(Record(doc_id, family, build=self._builder(ann, image, doc_id)))
        return out

    def _builder(self, ann: dict, image: dict, doc_id: str):
        def build():
            caption = _text(ann.get("caption"))
            pixels = load_image(os.path.join(self.image_dir, str(image.get("file_name", ""))))
            return SftExample(doc_id, sft_prompts.caption(pixels, long=self.long), caption,
                              {"caption": caption})
        return build


def crop_box(box: Sequence[float], width: int, height: int, size: int
             ) -> tuple[int, int, int, int] | None:
    """COCO (x, y, w, h) -> (x0, y0, x1, y1) in the center-cropped square resized to
    `size`, ends exclusive; None when nothing of it is left."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    scale = size / side
    x0 = max(0.0, (box[0] - left) * scale)
    y0 = max(0.0, (box[1] - top) * scale)
    x1 = min(float(size), (box[0] + box[2] - left) * scale)
    y1 = min(float(size), (box[1] + box[3] - top) * scale)
    out = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    return out if out[2] > out[0] and out[3] > out[1] else None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CocoInstances:
    """instances_*.json (+ `image_dir`): one boxes->image example per image, every object
    'name at (x0,y0,x1,y1)' in the model's `image_size` frame; the caption lists them."""

    annotations: str
    image_dir: str
    image_size: int = 256

    def records(self) -> list[Record]:
        data = _read_json(self.annotations, "COCO instances file")
        images = _coco_images(data, self.annotations)
        names = {c["id"]: c["name"] for c in data.get("categories", []) if "id" in c}
        by_image: dict[int, list[dict]] = {i: [] for i in images}
        out = []
        for ann in data["annotations"]:
            if ann.get("image_id") not in by_image:
                out.append(Record(f"coco_instance:{ann.get('id')}", "boxes_to_image",
                                  skipped="unknown_image_id"))
            else:
                by_image[ann["image_id"]].append(ann)
        for image_id, anns in by_image.items():
            doc_id = f"coco_boxes:{image_id}"
            out.append(Record(doc_id, "boxes_to_image",
                              build=self._builder(images[image_id], anns, names, doc_id)))
        return out

    def _builder(self, image: dict, anns: list[dict], names: dict, doc_id: str):
        def build():
            w, h = image.get("width"), image.get("height")
            phrases, objects = [], []
            for ann in anns:
                name, box = names.get(ann.get("category_id")), ann.get("bbox")
                if name is None or not isinstance(box, list) or len(box) != 4 or not w:
                    raise _Skip("bad_annotation")
                cropped = crop_box(box, w, h, self.image_size)
                if cropped is not None:
                    phrases.append(f"{name} at ({','.join(str(v) for v in cropped)})")
                    objects.append(name)
            if not anns:
                raise _Skip("no_boxes")
            if not phrases:
                raise _Skip("box_outside_crop")
            pixels = load_image(os.path.join(self.image_dir, str(image.get("file_name", ""))))
            caption = ", ".join(objects)
            return SftExample(doc_id, sft_prompts.boxes_to_image(caption, phrases), pixels,
                              {"boxes": phrases})
        return build


# -- VQAv2 ----------------------------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class Vqa2:
    """VQAv2 questions + annotations JSON; the answer is `multiple_choice_answer`; images
    are `image_dir/image_pattern.format(image_id=...)` (COCO's file names)."""

    questions: str
    annotations: str
    image_dir: str
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"

    def records(self) -> list[Record]:
        qs = _read_json(self.questions, "VQAv2 questions file")
        anns = _read_json(self.annotations, "VQAv2 annotations file")
        if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
            raise UserInputError(f"{self.questions!r} is not a VQAv2 questions file (no "
                                 "'questions' list).")
        if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
            raise UserInputError(f"{self.annotations!r} is not a VQAv2 annotations file (no "
                                 "'annotations' list).")
        answers = {a.get("question_id"): a for a in anns["annotations"] if isinstance(a, dict)}
        out = []
        for q in qs["questions"]:
            doc_id = f"vqa2:{q.get('question_id')}"
            ann = answers.get(q.get("question_id"))
            if ann is None:
                out.append(Record(doc_id, "vqa", skipped="no_annotation"))
                continue
            out.append(Record(doc_id, "vqa", build=self._builder(q, ann, doc_id)))
        return out

    def _builder(self, q: dict, ann: dict, doc_id: str):
        def build():
            question = _text(q.get("question"))
            answer = _text(ann.get("multiple_choice_answer"))
            try:
                name = self.image_pattern.format(image_id=q["image_id"])
            except (KeyError, ValueError):
                raise _Skip("missing_field") from None
            pixels = load_image(os.path.join(self.image_dir, name))
            return SftExample(doc_id, sft_prompts.vqa(pixels, question), answer,
                              {"answer": answer})
        return build


# -- condition folder -----------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ConditionFolder:
    """`root/image/NAME.*`, `root/<condition>/NAME.*` for each condition folder present
    (edge, segmentation, scribble, depth) and `root/caption/NAME.txt`."""

    root: str

    def records(self) -> list[Record]:
        image_dir = os.path.join(self.root, "image")
        if not fs.isdir(image_dir):
            raise MissingInputError(f"condition folder {self.root!r} has no image/ folder; "
                                    "see ConditionFolder's docstring for the layout.")
        names = sorted(os.path.splitext(f)[0] for f in fs.listdir(image_dir)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        out = []
        for condition in sft_prompts.CONDITIONS:
            folder = os.path.join(self.root, condition)
            if not fs.isdir(folder):
                continue
            for name in names:
                doc_id = f"condition:{condition}:{name}"
                out.append(Record(doc_id, f"{condition}_to_image",
                                  build=self._builder(condition, name, doc_id)))
        return out

    def _find(self, folder: str, name: str) -> str:
        for ext in IMAGE_EXTENSIONS:
            path = os.path.join(self.root, folder, name + ext)
            if fs.exists(path):
                return path
        return os.path.join(self.root, folder, name + ".png")

    def _builder(self, condition: str, name: str, doc_id: str):
        def build():
            caption_path = os.path.join(self.root, "caption", name + ".txt")
            if not fs.exists(caption_path):
                raise _Skip("missing_caption")
            try:
                with fs.open(caption_path, "rb") as f:
                    caption = _text(f.read().decode("utf-8"))
            except UnicodeDecodeError:
                raise _Skip("non_utf8_caption") from None
            cond = load_image(self._find(condition, name))
            image = load_image(self._find("image", name))
            return SftExample(doc_id, sft_prompts.condition_to_image(condition, cond, caption),
                              image, {"caption": caption})
        return build


# -- the source sft_preprocess reads ---------------------------------------------------------

@gin.configurable
class FormatSource:
    """Adapters per split, as a `sft_preprocess` source: examples per (split, family)
    in file order; records listed once per process (JSON parsing only), images loaded by
    the worker that writes their shard."""

    def __init__(self, splits: dict[str, Sequence[Any]] = gin.REQUIRED):
        self.splits = {k: list(v) for k, v in splits.items()}
        self._records: dict | None = None

    def _all(self) -> dict[tuple[str, str], list[Record]]:
        if self._records is None:
            records: dict[tuple[str, str], list[Record]] = {}
            for split, adapters in self.splits.items():
                for adapter in adapters:
                    for r in adapter.records():
                        records.setdefault((split, r.family), []).append(r)
            self._records = records
        return self._records

    def __getstate__(self):  # Beam pickles the source; workers list records again.
        return {"splits": self.splits, "_records": None}

    def num_examples(self, split: str, family: str) -> int:
        return len(self._all().get((split, family), []))

    def read(self, split: str, family: str, start: int, stop: int
             ) -> Iterator[SftExample | Skipped]:
        for record in self._all().get((split, family), [])[start:stop]:
            if record.skipped:
                yield Skipped(record.doc_id, record.skipped)
                continue
            try:
                yield record.build()
            except _Skip as e:
                yield Skipped(record.doc_id, e.reason)

    def report(self) -> dict:
        """Records per (split, family) before loading; the manifest counts the skips."""
        return {f"{split}/{family}": len(v) for (split, family), v in sorted(self._all().items())}
