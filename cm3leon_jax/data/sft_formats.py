"""Public-format adapters: files in a dataset's own layout -> SFT examples.

    source = FormatSource({"train": [InstructPix2PixJsonl("edits.jsonl"),
                                     CocoCaptions("captions_train2017.json", "train2017/")],
                           "validation": [CocoCaptions("captions_val2017.json", "val2017/")]})
    sft_preprocess(..., source=source)       # the same shards as the built-in corpus

(the `sft` run evaluates on the validation split and refuses SFT data without one)

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
(missing_field, empty_text, bad_text, bad_annotation, unknown_image_id, missing_image,
corrupt_image, unsupported_image_mode, unsupported_image_format, duplicate_name, no_boxes,
...) are counted per family and split in the SFT manifest, with sample ids, and a file
that cannot be read at all is one clear error. Nothing is dropped silently. Image files
are read as the tokenizer would see them (`image_inputs.read_rgb`: EXIF orientation
applied, 16-bit scaled to 8, transparency over white; floats and wider integers are
`unsupported_image_mode`). `FormatSource.fingerprint` (sizes and modification times of
the files the adapters read) goes into the SFT plan: a rerun after they changed is
refused.

Boxes follow the image into the model's frame: `image_inputs` center-crops a
non-square image to a square and resizes it to the image tokenizer's size, so each COCO
box (x, y, w, h) is cropped and scaled the same way from the loaded image's own shape
(pixels, ends exclusive). A box the crop cuts away entirely is left out of its example
(caption and boxes name what the model's frame shows); an image whose boxes are all cut
away is counted as `box_outside_crop`.
`sft_preprocess` gives `CocoInstances` the tokenizer's size (`FormatSource.with_image_size`)
and refuses a different one bound by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import gin
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.data.sft_examples import SftExample
from cm3leon_jax.data.sft_preprocess import Skipped
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.images import UnsupportedImageError
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
    """uint8[h, w, 3], or `_Skip('missing_image' | 'unsupported_image_mode' |
    'corrupt_image')`."""
    try:
        return image_inputs.read_rgb(path)
    except FileNotFoundError:
        raise _Skip("missing_image") from None
    except UnsupportedImageError:  # Floats or wide integers (`images.pil_rgb`).
        raise _Skip("unsupported_image_mode") from None
    except ValueError:
        raise _Skip("corrupt_image") from None


def _text(value: Any) -> str:
    """The stripped text, or `_Skip`: not a string, blank, or not encodable as UTF-8 (a
    lone surrogate from a JSON escape, which the text tokenizer cannot take)."""
    if not isinstance(value, str):
        raise _Skip("missing_field")
    if not value.strip():
        raise _Skip("empty_text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Skip("bad_text") from None
    return value.strip()


def _id(value: Any) -> int | str | None:
    """A JSON id usable as a key (a number or a string), else None."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# -- InstructPix2Pix ------------------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class InstructPix2PixJsonl:
    """Edit triplets, one JSON a line: {"original_image", "edit_prompt", "edited_image"}
    (`input_image` / `instruction` / `output_image` are accepted too)."""

    path: str

    def inputs(self) -> tuple[str, ...]:
        """The files and folders read (`FormatSource.fingerprint`; the images the lines
        name are not among them)."""
        return (self.path,)

    def records(self) -> list[Record]:
        if not fs.exists(self.path):
            raise MissingInputError(f"InstructPix2Pix file {self.path!r} does not exist.")
        root, out = os.path.dirname(fs.abspath(self.path)), []
        for n, row in fs.read_jsonl(self.path):
            # The path as given: two files of one name in different folders stay apart.
            doc_id = f"ip2p:{self.path}:{n}"
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
    images: dict = {}
    for im in data["images"]:
        if isinstance(im, dict) and _id(im.get("id")) is not None:
            if im["id"] in images:  # Which picture its captions or boxes belong to is unknown.
                raise UserInputError(f"{path!r} lists image id {im['id']!r} twice "
                                     f"({images[im['id']].get('file_name')!r} and "
                                     f"{im.get('file_name')!r}); give each image one id.")
            images[im["id"]] = im
    return images


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CocoCaptions:
    """captions_*.json (+ `image_dir`): one caption example per annotation; `long=True`
    files them under long_caption (Localized Narratives in the same layout)."""

    annotations: str
    image_dir: str
    long: bool = False

    def inputs(self) -> tuple[str, ...]:
        """The files and folders read (`FormatSource.fingerprint`)."""
        return (self.annotations, self.image_dir)

    def records(self) -> list[Record]:
        data = _read_json(self.annotations, "COCO captions file")
        images = _coco_images(data, self.annotations)
        family = "long_caption" if self.long else "caption"
        out, seen = [], set()
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                out.append(Record(f"coco_caption:#{len(out)}", family, skipped="bad_annotation"))
                continue
            doc_id = f"coco_caption:{ann.get('id', len(out))}"
            if doc_id in seen:
                out.append(Record(f"{doc_id}#{len(out)}", family, skipped="duplicate_record"))
                continue
            seen.add(doc_id)
            image = images.get(_id(ann.get("image_id")))
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
    'name at (x0,y0,x1,y1)' in the model's `image_size` frame; the caption lists them.

    `image_size`: the image tokenizer's (None: `sft_preprocess` sets it, through
    `FormatSource.with_image_size`; the boxes must be in the frame the images are encoded
    in). An image whose `width`/`height` in the file differ from its pixels is skipped
    (`image_size_mismatch`): its boxes are in another frame."""

    annotations: str
    image_dir: str
    image_size: int | None = None

    def inputs(self) -> tuple[str, ...]:
        """The files and folders read (`FormatSource.fingerprint`)."""
        return (self.annotations, self.image_dir)

    def records(self) -> list[Record]:
        if self.image_size is None:
            raise UserInputError(
                f"CocoInstances({self.annotations!r}) has no image_size: read it through "
                "sft_preprocess (which gives it the image tokenizer's), or give "
                "image_size=<the tokenizer's image size>.")
        data = _read_json(self.annotations, "COCO instances file")
        images = _coco_images(data, self.annotations)
        names = {c["id"]: c.get("name") for c in data.get("categories", [])
                 if isinstance(c, dict) and _id(c.get("id")) is not None}
        by_image: dict[int, list[dict]] = {i: [] for i in images}
        out = []
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                out.append(Record(f"coco_instance:#{len(out)}", "boxes_to_image",
                                  skipped="bad_annotation"))
            elif _id(ann.get("image_id")) not in by_image:
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
            if not anns:
                raise _Skip("no_boxes")
            objects = []
            for ann in anns:
                if ann.get("iscrowd"):  # A region of many objects, not one (COCO's rule).
                    continue
                name, box = names.get(_id(ann.get("category_id"))), ann.get("bbox")
                if (name is None or not isinstance(box, list) or len(box) != 4
                        or not all(_number(v) for v in box) or box[2] <= 0 or box[3] <= 0):
                    raise _Skip("bad_annotation")
                objects.append((_text(name), box))
            if not objects:
                raise _Skip("no_boxes")
            stated = {k: image[k] for k in ("width", "height") if k in image}
            if not all(_number(v) for v in stated.values()):
                raise _Skip("bad_annotation")
            pixels = load_image(os.path.join(self.image_dir, str(image.get("file_name", ""))))
            h, w = pixels.shape[:2]  # The frame the tokenizer crops, whatever the file says.
            if stated.get("width", w) != w or stated.get("height", h) != h:
                raise _Skip("image_size_mismatch")
            phrases, kept = [], []
            for name, box in objects:
                cropped = crop_box(box, w, h, self.image_size)
                if cropped is not None:
                    phrases.append(f"{name} at ({','.join(str(v) for v in cropped)})")
                    kept.append(name)
            if not phrases:
                raise _Skip("box_outside_crop")
            caption = ", ".join(kept)
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

    def inputs(self) -> tuple[str, ...]:
        """The files and folders read (`FormatSource.fingerprint`)."""
        return (self.questions, self.annotations, self.image_dir)

    def records(self) -> list[Record]:
        qs = _read_json(self.questions, "VQAv2 questions file")
        anns = _read_json(self.annotations, "VQAv2 annotations file")
        if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
            raise UserInputError(f"{self.questions!r} is not a VQAv2 questions file (no "
                                 "'questions' list).")
        if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
            raise UserInputError(f"{self.annotations!r} is not a VQAv2 annotations file (no "
                                 "'annotations' list).")
        answers = {a["question_id"]: a for a in anns["annotations"]
                   if isinstance(a, dict) and _id(a.get("question_id")) is not None}
        out, seen = [], set()
        for q in qs["questions"]:
            if not isinstance(q, dict):
                out.append(Record(f"vqa2:#{len(out)}", "vqa", skipped="bad_annotation"))
                continue
            doc_id = f"vqa2:{q.get('question_id')}"
            if doc_id in seen:
                out.append(Record(f"{doc_id}#{len(out)}", "vqa", skipped="duplicate_record"))
                continue
            seen.add(doc_id)
            ann = answers.get(_id(q.get("question_id")))
            if ann is None:
                out.append(Record(doc_id, "vqa", skipped="no_annotation"))
                continue
            if not isinstance(_id(q.get("image_id")), int) or (
                    "image_id" in ann and ann["image_id"] != q["image_id"]):
                out.append(Record(doc_id, "vqa", skipped="bad_annotation"))  # Whose image?
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


def _supported(file_name: str) -> bool:
    return file_name.lower().endswith(IMAGE_EXTENSIONS)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ConditionFolder:
    """`root/image/NAME.*`, `root/<condition>/NAME.*` for each condition folder present
    (edge, segmentation, scribble, depth) and `root/caption/NAME.txt` (UTF-8, a byte-order
    mark allowed).

    Extensions match in any case (cat.PNG); an image or condition map in another format
    than IMAGE_EXTENSIONS (.tif, .gif, ...) is counted as `unsupported_image_format`.
    Hidden files (.DS_Store) are not images. Per condition, a map or caption whose NAME
    has no image is counted as `missing_image`, and a second file of one NAME in image/
    or the condition's folder (a.png beside a.jpg: the one whose extension comes first in
    IMAGE_EXTENSIONS is read) as `duplicate_name`, under `condition:<c>:<folder>/<file>`."""

    root: str

    def _files(self, folder: str) -> tuple[dict[str, str], list[str]]:
        """({NAME: file name} of `root/folder`, the other files of those NAMEs); of two
        files of one NAME, the supported one whose extension comes first in
        IMAGE_EXTENSIONS is kept (then the first by name)."""
        def rank(file_name):
            ext = os.path.splitext(file_name)[1].lower()
            return IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(
                IMAGE_EXTENSIONS)
        files: dict[str, str] = {}
        others = []
        for f in fs.listdir(os.path.join(self.root, folder)):
            name = os.path.splitext(f)[0]
            if f.startswith("."):
                continue
            if name in files and rank(files[name]) <= rank(f):
                others.append(f)
                continue
            if name in files:
                others.append(files[name])
            files[name] = f
        return files, sorted(others)

    def inputs(self) -> tuple[str, ...]:
        """The files and folders read (`FormatSource.fingerprint`)."""
        return (self.root,)

    def records(self) -> list[Record]:
        image_dir = os.path.join(self.root, "image")
        if not fs.isdir(image_dir):
            raise MissingInputError(f"condition folder {self.root!r} has no image/ folder; "
                                    "see ConditionFolder's docstring for the layout.")
        images, other_images = self._files("image")
        caption_dir = os.path.join(self.root, "caption")
        captions = {os.path.splitext(f)[0] for f in fs.listdir(caption_dir)
                    if not f.startswith(".")} if fs.isdir(caption_dir) else set()
        out = []
        for condition in sft_prompts.CONDITIONS:
            if not fs.isdir(os.path.join(self.root, condition)):
                continue
            maps, other_maps = self._files(condition)
            family = f"{condition}_to_image"
            for name in sorted(set(images) | set(maps) | captions):
                doc_id = f"condition:{condition}:{name}"
                if name not in images:
                    out.append(Record(doc_id, family, skipped="missing_image"))
                    continue
                files = [images[name]] + ([maps[name]] if name in maps else [])
                if not all(_supported(f) for f in files):
                    out.append(Record(doc_id, family, skipped="unsupported_image_format"))
                    continue
                cond = os.path.join(self.root, condition, maps[name]) if name in maps else None
                image = os.path.join(self.root, "image", images[name])
                out.append(Record(doc_id, family,
                                  build=self._builder(condition, name, cond, image, doc_id)))
            out += [Record(f"condition:{condition}:{folder}/{f}", family,
                           skipped="duplicate_name")
                    for folder, others in (("image", other_images), (condition, other_maps))
                    for f in others]
        return out

    def _builder(self, condition: str, name: str, cond_path: str | None, image_path: str,
                 doc_id: str):
        def build():
            caption_path = os.path.join(self.root, "caption", name + ".txt")
            if not fs.exists(caption_path):
                raise _Skip("missing_caption")
            try:
                with fs.open(caption_path, "rb") as f:
                    caption = _text(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError:
                raise _Skip("non_utf8_caption") from None
            if cond_path is None:
                raise _Skip("missing_image")
            cond = load_image(cond_path)
            image = load_image(image_path)
            return SftExample(doc_id, sft_prompts.condition_to_image(condition, cond, caption),
                              image, {"caption": caption})
        return build


# -- the source sft_preprocess reads ---------------------------------------------------------

def _digest_path(digest: Any, path: str) -> None:
    """Adds a file's size (and local modification time), or a folder's listing with each
    file's, to `digest`; a missing path as such."""
    if fs.isdir(path):
        root = path.rstrip("/")
        files = []
        for folder, _, names in fs.walk(root):
            below = folder.rstrip("/")[len(root):].strip("/")
            files += [f"{below}/{n}" if below else n for n in names]
        for rel in sorted(files):
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            if not fs.is_remote(path):  # In a bucket, the listing alone (one call).
                digest.update("{} {}\0".format(*fs.size_and_mtime(fs.join(root, rel))).encode())
    elif fs.exists(path):
        digest.update("file {} {}\0".format(*fs.size_and_mtime(path)).encode())
    else:
        digest.update(b"missing\0")


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

    def split_names(self) -> list[str]:
        """The source's splits (`sft_preprocess` refuses one it does not plan)."""
        return list(self.splits)

    def family_names(self) -> list[str]:
        """The families its records belong to (`sft_preprocess` refuses one it does not
        plan), sorted."""
        return sorted({family for _, family in self._all()})

    def identity(self) -> dict:
        """Each split's adapters and their settings (recorded in plan.json)."""
        return {split: [[type(a).__name__, dataclasses.asdict(a)]
                        if dataclasses.is_dataclass(a) else repr(a) for a in adapters]
                for split, adapters in self.splits.items()}

    def fingerprint(self) -> str:
        """A hash of what the adapters read (their `inputs()`), recorded in plan.json so
        that a rerun after the files changed is refused: each file's size and, on the local
        disk, modification time; each folder's file names (and, locally, theirs). Not seen:
        an image a JSONL line names, edited in place; in a bucket, a file rewritten under
        the same name; an adapter without `inputs()`."""
        digest = hashlib.sha1()
        for split, adapters in self.splits.items():
            for a in adapters:
                digest.update(f"{split}\0{type(a).__name__}\0".encode())
                for path in a.inputs() if hasattr(a, "inputs") else ():
                    digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
                    _digest_path(digest, path)
        return digest.hexdigest()[:16]

    def with_image_size(self, size: int) -> "FormatSource":
        """This source with the image tokenizer's `size` given to the adapters that place
        boxes in the encoded image's frame (`CocoInstances.image_size` left None); one
        bound to another size is refused: its boxes would not match the images."""
        splits = {}
        for split, adapters in self.splits.items():
            splits[split] = []
            for a in adapters:
                if dataclasses.is_dataclass(a) and hasattr(a, "image_size"):
                    if a.image_size is None:
                        a = dataclasses.replace(a, image_size=size)
                    elif a.image_size != size:
                        raise UserInputError(
                            f"{type(a).__name__}.image_size={a.image_size} but the image "
                            f"tokenizer encodes {size}x{size} images, so the boxes would be in "
                            "another frame: leave image_size unset (sft_preprocess gives it "
                            "the tokenizer's).")
                splits[split].append(a)
        return FormatSource(splits)

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
