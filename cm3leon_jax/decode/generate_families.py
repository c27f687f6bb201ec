"""The SFT families in the `generate` run mode: requests from a JSONL prompts file.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/generate.gin \
        --gin.MODEL_DIR="'runs/generated'" --gin.generate.checkpoint="'runs/demo/sft'" \
        --gin.generate.prompts_file="'prompts.jsonl'"

One request a line; image paths are relative to the file's folder:

    {"family": "edit", "image": "a.png", "instruction": "make the red circle blue"}
    {"family": "grounded", "condition": "edge", "condition_image": "e.png", "caption": "..."}
    {"family": "boxes_to_image", "caption": "a red circle", "boxes": ["red circle at (2,2,9,9)"]}
    {"family": "how_to_write", "text": "cat"}
    {"family": "vqa", "image": "a.png", "question": "How many shapes are there?"}
    {"family": "caption", "image": "a.png"}        ("long_caption": the detailed one)
    {"family": "segment", "image": "a.png", "phrase": "the red circle"}

Writes MODEL_DIR/families/NNN_<family>_<sample>.png (image outputs), families.json (each
request with its outputs and the settings) and families.png (a contact sheet of the first
64 pictures: each request's input image, if any, then its outputs, captioned). The whole
file, its images decoded, is read and checked before the model is restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image as PILImage

from cm3leon_jax import fs
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import pictures
from cm3leon_jax.decode import processors as proc
from cm3leon_jax.decode import prompts as prompts_lib
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.vocab.image_inputs import read_rgb

# family -> (the fields it needs, the field holding its input image or None)
FIELDS = {
    "edit": (("image", "instruction"), "image"),
    "grounded": (("condition", "condition_image", "caption"), "condition_image"),
    "boxes_to_image": (("caption", "boxes"), None),
    "how_to_write": (("text",), None),
    "vqa": (("image", "question"), "image"),
    "caption": (("image",), "image"),
    "long_caption": (("image",), "image"),
    "segment": (("image", "phrase"), "image"),
}
# The most tokens a text answer of these families may take (Generator.vqa / describe's
# max_tokens); the image families generate one image's codes.
TEXT_TOKENS = {"vqa": 16, "caption": 48, "long_caption": 48}
# The request's key holding its input image, decoded (not written to families.json).
PIXELS = "_pixels"
# families.png shows at most this many pictures (a long prompts file's sheet would be huge).
SHEET_IMAGES = 64


def read_requests(path: str) -> list[dict]:
    """The file's requests, checked, with their input images decoded (`PIXELS`); image paths
    made absolute. All of it before the model is restored: one error per bad line."""
    if not fs.isfile(path):
        raise MissingInputError(f"prompts_file {path!r} "
                                f"{'is a folder' if fs.isdir(path) else 'does not exist'}; give "
                                "a JSONL file with one request a line (see "
                                "decode/generate_families.py).")
    root, out = os.path.dirname(fs.abspath(path)), []
    for n, request in fs.read_jsonl(path):
        out.append({**_checked(request, f"{path}, line {n}", root), "line": n})
    if not out:
        raise UserInputError(f"prompts_file {path!r} holds no requests.")
    return out


def _checked(request: Any, where: str, root: str) -> dict:
    """One line's request, its fields checked and its input image read (`PIXELS`)."""
    if isinstance(request, json.JSONDecodeError):
        raise UserInputError(f"{where}: not JSON ({request.msg}).")
    family = request.get("family") if isinstance(request, dict) else None
    if family not in FIELDS:
        raise UserInputError(f"{where}: family {family!r} is unknown; use one of "
                             f"{tuple(FIELDS)}.")
    needed, image_field = FIELDS[family]
    missing = [k for k in needed if not request.get(k)]
    if missing:
        raise UserInputError(f"{where}: {family} request needs {missing}.")
    boxes = request.get("boxes") if family == "boxes_to_image" else []
    if not isinstance(boxes, list) or not all(isinstance(b, str) and b.strip() for b in boxes):
        raise UserInputError(f"{where}: boxes must be a list of non-empty strings, one a box "
                             f'(["red circle at (2,2,9,9)"]), got {boxes!r}.')
    texts = [k for k in needed if k != "boxes" and not isinstance(request[k], str)]
    if texts:
        raise UserInputError(f"{where}: {texts[0]} must be a string, got {request[texts[0]]!r}.")
    if family == "grounded" and request["condition"] not in sft_prompts.CONDITIONS:
        raise UserInputError(f"{where}: condition {request['condition']!r} is unknown; use "
                             f"one of {tuple(sft_prompts.CONDITIONS)}.")
    if not image_field:
        return dict(request)
    image = os.path.join(root, request[image_field])
    if not fs.exists(image):
        raise MissingInputError(f"{where}: {image_field} {image!r} does not exist.")
    try:
        pixels = read_rgb(image)
    except ValueError as e:  # MissingInputError (a folder) too: it is one.
        raise UserInputError(f"{where}: {image_field}: {e}") from None
    return {**request, image_field: image, PIXELS: pixels}


def check_requests_fit(requests: Sequence[dict], path: str, max_length: int, vocab: Any,
                       checkpoint: str) -> None:
    """An error naming the file and line of the first request whose prompt leaves no room
    in the model's `max_length` for what its family generates (the sampler would refuse it
    after the restore, with the outputs of the requests before it half written). Each
    prompt is built as the Generator builds it, with an input image's codes all 0: only
    their number counts."""
    codes = np.zeros(vocab.layout.image_length, np.int32)
    for request in requests:
        family = request["family"]
        new = TEXT_TOKENS.get(family) or proc.ImageCodesOnly(vocab.layout).max_new_tokens
        size = sft_prompts.prompt_ids(request_prompt(request, codes), vocab).size
        if size > prompts_lib.room(max_length, new):
            raise UserInputError(
                f"{path}, line {request['line']}: the {family} request's prompt has {size} "
                f"tokens, the model has room for {prompts_lib.room(max_length, new)} "
                f"(DecoderConfig.max_length={max_length} of {checkpoint!r} minus the {new} "
                "tokens it generates and the opening <eos>): shorten its text.")


def request_prompt(request: dict, codes: np.ndarray) -> sft_prompts.Prompt:
    """The SFT prompt of `request` (what its Generator method builds) on an input image's
    `codes`; the families without an input image ignore them."""
    family = request["family"]
    if family == "edit":
        return sft_prompts.edit(codes, request["instruction"])
    if family == "grounded":
        return sft_prompts.condition_to_image(request["condition"], codes, request["caption"])
    if family == "boxes_to_image":
        return sft_prompts.boxes_to_image(request["caption"], list(request["boxes"]))
    if family == "how_to_write":
        return sft_prompts.how_to_write(request["text"])
    if family == "segment":
        return sft_prompts.segment(codes, request["phrase"])
    if family == "vqa":
        return sft_prompts.vqa(codes, request["question"])
    return sft_prompts.caption(codes, long=family == "long_caption")


def run_request(gen: Any, request: dict, num_samples: int, image_sampling: Any,
                text_sampling: Any, seed: int) -> Any:
    """One request through its Generator method: `Images` or a list of strings."""
    family = request["family"]
    kw = dict(sampling=image_sampling, seed=seed, num_samples=num_samples)
    image = [request[PIXELS]] if PIXELS in request else None
    if family == "edit":
        return gen.edit(image, [request["instruction"]], **kw)
    if family == "grounded":
        return gen.grounded(image, [request["caption"]],
                            condition=request["condition"], **kw)
    if family == "boxes_to_image":
        return gen.boxes_to_image([request["caption"]], [list(request["boxes"])], **kw)
    if family == "how_to_write":
        return gen.how_to_write([request["text"]], **kw)
    if family == "segment":
        return gen.segment(image, [request["phrase"]], **kw)
    if family == "vqa":
        return gen.vqa(image, [request["question"]], max_tokens=TEXT_TOKENS[family],
                       sampling=text_sampling, seed=seed)
    return gen.describe(image, long=family == "long_caption", max_tokens=TEXT_TOKENS[family],
                        sampling=text_sampling, seed=seed)


def generate_families(gen: Any, prompts: str | Sequence[dict], out_dir: str, *,
                      num_samples: int = 1, image_sampling: Any = None,
                      text_sampling: Any = None, seed: int = 0) -> list[dict]:
    """Runs every request of `prompts` (the prompts file, or what `read_requests` read from
    it); writes PNGs, families.json, then families.png (its first `SHEET_IMAGES` pictures)."""
    requests = read_requests(prompts) if isinstance(prompts, str) else list(prompts)
    texts = sorted({r["family"] for r in requests if r["family"] in TEXT_TOKENS})
    if num_samples > 1 and texts:
        print(f"[generate] the {', '.join(texts)} requests answer once each "
              f"(generate.num_samples={num_samples} applies to the image families); "
              "families.json records each request's decoding", flush=True)
    folder = fs.join(out_dir, "families")
    fs.makedirs(folder)
    entries, sheet, labels = [], [], []
    size = gen.image_tokenizer.image_size
    for i, request in enumerate(requests):
        family = request["family"]
        result = run_request(gen, request, num_samples, image_sampling, text_sampling, seed)
        if PIXELS in request:
            sheet.append(np.asarray(PILImage.fromarray(request[PIXELS]).resize((size, size))))
            labels.append(f"{i}: input")
        entry = {k: v for k, v in request.items() if k != PIXELS}
        entry["decoding"] = decoding(family, num_samples, image_sampling, text_sampling)
        if isinstance(result, list):
            entry["outputs"] = result
            labels[-1] = f"{i}: {request.get('question', family)} -> {result[0]}"
        else:
            entry["outputs"] = [_write_png(out_dir, f"{i:03d}_{family}_{j}.png", image)
                                for j, image in enumerate(result.images)]
            sheet += list(result.images)
            labels += [f"{i}: {family}"] * len(result.images)
        entries.append(entry)
    settings = {"num_samples": num_samples, "seed": seed,
                "image_sampling": _settings(image_sampling),
                "text_sampling": _settings(text_sampling)}
    with fs.open(fs.join(out_dir, "families.json"), "w") as f:
        json.dump({"requests": entries, "settings": settings}, f, indent=2)
    n = min(SHEET_IMAGES, len(sheet))
    if n < len(sheet):
        print(f"[generate] families.png shows the first {n} of {len(sheet)} pictures",
              flush=True)
    pictures.grid(np.stack(sheet[:n]), labels[:n], fs.join(out_dir, "families.png"),
                  columns=min(8, n))
    return entries


def decoding(family: str, num_samples: int, image_sampling: Any, text_sampling: Any) -> dict:
    """How `run_request` decodes a request of `family`: a text family answers once with the
    text sampling; an edit guides by the paper's two scales (image 1.5, text 7.5) unless
    the image sampling turns guidance off; the other image families as the image sampling
    says."""
    if family in TEXT_TOKENS:
        return {"num_samples": 1, "sampling": _settings(text_sampling)}
    out = {"num_samples": num_samples, "sampling": _settings(image_sampling)}
    if family == "edit" and getattr(image_sampling, "guidance", "cfg") != "none":
        out["guidance"] = "two-scale: image 1.5, text 7.5 (Generator.edit)"
    return out


def _write_png(out_dir: str, name: str, image: np.ndarray) -> str:
    """out_dir/families/name (any file system fs.py speaks); returns its relative path."""
    with fs.open(fs.join(out_dir, "families", name), "wb") as f:
        PILImage.fromarray(image).save(f, format="PNG")
    return os.path.join("families", name)


def _settings(sampling: Any) -> dict | None:
    return None if sampling is None else dataclasses.asdict(sampling)
