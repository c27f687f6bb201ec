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
request with its outputs and the settings) and families.png (a contact sheet: each
request's input image, if any, then its outputs, captioned).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from PIL import Image as PILImage

from cm3leon_jax import fs
from cm3leon_jax.data import sft_prompts
from cm3leon_jax.decode import pictures
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


def read_requests(path: str) -> list[dict]:
    """The file's requests, checked; image paths made absolute. One error per bad line."""
    if not fs.exists(path):
        raise MissingInputError(f"prompts_file {path!r} does not exist; give a JSONL file with "
                                "one request a line (see decode/generate_families.py).")
    root, out = os.path.dirname(fs.abspath(path)), []
    for n, request in fs.read_jsonl(path):
        where = f"{path}, line {n}"
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
        if family == "grounded" and request["condition"] not in sft_prompts.CONDITIONS:
            raise UserInputError(f"{where}: condition {request['condition']!r} is unknown; use "
                                 f"one of {tuple(sft_prompts.CONDITIONS)}.")
        if image_field:
            image = os.path.join(root, request[image_field])
            if not fs.exists(image):
                raise MissingInputError(f"{where}: {image_field} {image!r} does not exist.")
            request = {**request, image_field: image}
        out.append({**request, "line": n})
    if not out:
        raise UserInputError(f"prompts_file {path!r} holds no requests.")
    return out


def run_request(gen: Any, request: dict, num_samples: int, image_sampling: Any,
                text_sampling: Any, seed: int) -> Any:
    """One request through its Generator method: `Images` or a list of strings."""
    family = request["family"]
    kw = dict(sampling=image_sampling, seed=seed, num_samples=num_samples)
    if family == "edit":
        return gen.edit([read_rgb(request["image"])], [request["instruction"]], **kw)
    if family == "grounded":
        return gen.grounded([read_rgb(request["condition_image"])], [request["caption"]],
                            condition=request["condition"], **kw)
    if family == "boxes_to_image":
        return gen.boxes_to_image([request["caption"]], [list(request["boxes"])], **kw)
    if family == "how_to_write":
        return gen.how_to_write([request["text"]], **kw)
    if family == "segment":
        return gen.segment([read_rgb(request["image"])], [request["phrase"]], **kw)
    image = [read_rgb(request["image"])]
    if family == "vqa":
        return gen.vqa(image, [request["question"]], sampling=text_sampling, seed=seed)
    return gen.describe(image, long=family == "long_caption", sampling=text_sampling, seed=seed)


def generate_families(gen: Any, prompts_file: str, out_dir: str, *, num_samples: int = 1,
                      image_sampling: Any = None, text_sampling: Any = None,
                      seed: int = 0) -> list[dict]:
    """Runs every request of `prompts_file`; writes PNGs, families.json, families.png."""
    requests = read_requests(prompts_file)
    folder = os.path.join(out_dir, "families")
    fs.makedirs(folder)
    entries, sheet, labels = [], [], []
    size = gen.image_tokenizer.image_size
    for i, request in enumerate(requests):
        family = request["family"]
        result = run_request(gen, request, num_samples, image_sampling, text_sampling, seed)
        image_field = FIELDS[family][1]
        if image_field:
            sheet.append(np.asarray(PILImage.fromarray(read_rgb(request[image_field]))
                                    .resize((size, size))))
            labels.append(f"{i}: input")
        entry = dict(request)
        if isinstance(result, list):
            entry["outputs"] = result
            labels[-1] = f"{i}: {request.get('question', family)} -> {result[0]}"
        else:
            paths = []
            for j, image in enumerate(result.images):
                name = f"{i:03d}_{family}_{j}.png"
                PILImage.fromarray(image).save(os.path.join(folder, name))
                paths.append(os.path.join("families", name))
                sheet.append(image)
                labels.append(f"{i}: {family}")
            entry["outputs"] = paths
        entries.append(entry)
    pictures.grid(np.stack(sheet), labels, os.path.join(out_dir, "families.png"),
                  columns=min(8, len(sheet)))
    settings = {"num_samples": num_samples, "seed": seed,
                "image_sampling": _settings(image_sampling),
                "text_sampling": _settings(text_sampling)}
    with fs.open(os.path.join(out_dir, "families.json"), "w") as f:
        json.dump({"requests": entries, "settings": settings}, f, indent=2)
    return entries


def _settings(sampling: Any) -> dict | None:
    return None if sampling is None else dataclasses.asdict(sampling)
