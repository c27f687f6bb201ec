"""`user_image_text`: a user's own image-text pairs as a TFDS dataset.

Two source layouts:
- a JSONL file, one `{"image": path, "text": caption}` per line; relative image
  paths are relative to the JSONL file's folder and may not lead out of it
  (`../x.png` is `image_outside_folder`; give an absolute path for images elsewhere);
- a folder of images (searched recursively), each captioned by a UTF-8 `.txt`
  file of the same stem beside it (`cat.jpg` + `cat.txt`; names match whatever
  their case: `Cat.JPG` + `cat.TXT`).
Captions are read without their surrounding whitespace (the newline an editor or `echo`
ends a .txt file with, spaces) and with Windows line ends (CRLF) as LF.

Two splits: `validation` holds the records whose image hashes below
`validation_fraction`, `train` the rest. The hash is of the image's name (a folder's
path relative to it; a JSONL line's normalised path), so every caption of one image is in
the same split, the split is the same on every build, and a record stays in its split
when others are added. The one exception: when no usable record hashes below the fraction
(a small source), the usable image with the lowest hash is held out so that the trainer's
evaluation has data (if another image with a usable record stays in train); that fallback
image goes back to train once an added usable record hashes below the fraction, or an added
usable image hashes lower than it (which is then held out instead).

Nothing bad is dropped silently and nothing bad stops the build: every record
that cannot become an example is counted under one reason (REASONS), and
`report.json` beside the prepared data (`builder.data_path / "report.json"`)
holds the counts and up to MAX_REPORTED_IDS ids per reason; a summary is logged.

Images are EXIF-rotated and converted to RGB: transparent images (RGBA, LA,
palette with transparency) are composited over white, 16-bit grayscale is scaled
to 8 bits, every other mode (L, 1, P, CMYK, YCbCr, ...) goes through PIL's RGB
conversion, except floats (mode F) and integers beyond 16 bits, which have no one 8-bit
reading (`unsupported_image_mode`). Then they are centre-cropped to a square and resized
(bicubic) down to `image_size`. An image whose shorter side is below `image_size` is
rejected (`image_too_small`), never upscaled; one PIL refuses to open as a decompression
bomb (over twice `PIL.Image.MAX_IMAGE_PIXELS`) is `decompression_bomb`.

Usage (Python or gin; everything lives in the config, so the builder pickles):
    builder = UserImageText(source="captions.jsonl", image_size=256, data_dir=d)
    builder.download_and_prepare(download_config=offline_download_config())
    ds = builder.as_dataset(split="train")          # or split="validation"
or `load_user_data("captions.jsonl", 256, d)`. The `preprocess` mode reads it with
gin_configs/runs/preprocess_user.gin. Sources may be local or on a bucket (`gs://...`):
every file is read through `cm3leon_jax/fs.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import zlib
from collections.abc import Iterator, Sequence

import gin
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from cm3leon_jax import fs
from cm3leon_jax.data.synthetic_tfds import offline_download_config
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.images import UnsupportedImageError, pil_rgb

REASONS = ("bad_record", "duplicate_record", "image_outside_folder", "missing_image",
           "corrupt_image", "truncated_image", "unsupported_image_mode", "image_too_small",
           "decompression_bomb", "missing_caption", "empty_caption", "non_utf8_caption")
SPLITS = ("train", "validation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".webp", ".tif",
                  ".tiff")
JSONL_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_IDS = 20
REPORT_NAME = "report.json"


@dataclasses.dataclass(eq=False)
class UserDataConfig(tfds.core.BuilderConfig):
    """Where the pairs are (`source`: a .jsonl file or a folder), the square image side and
    the share of records held out for validation."""

    source: str = ""
    image_size: int = 256
    validation_fraction: float = 0.05


def make_user_config(source: str | os.PathLike, image_size: int = 256,
                     validation_fraction: float = 0.05) -> UserDataConfig:
    """A config named after the source's stem, size, validation share and a hash of its
    absolute path, so two sources (or settings) never share a data folder."""
    path = str(source) if fs.is_remote(source) else fs.abspath(os.path.expanduser(str(source)))
    if not fs.exists(path):
        raise MissingInputError(f"user data source {str(source)!r} does not exist; give a "
                                ".jsonl file or a folder of images with .txt captions.")
    check_kind(path)  # Before a builder makes its folder.
    if image_size < 8:
        raise UserInputError(f"image_size must be >= 8, got {image_size}.")
    if not 0.0 < validation_fraction < 1.0:
        raise UserInputError(f"validation_fraction must be in (0, 1), got {validation_fraction}; "
                             "the trainer evaluates on the validation split.")
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    stem = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "data"
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:8]
    held_out = f"{validation_fraction:g}".replace(".", "p")
    return UserDataConfig(name=f"{stem}_{image_size}px_val{held_out}_{digest}", source=path,
                          image_size=image_size, validation_fraction=validation_fraction,
                          description=f"Image-text pairs from {path}, {image_size}px.")


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Record:
    """One source entry: its id, image path (local or remote), caption, the reason it is
    unusable before the image is even opened (None when the caption side is fine), and the
    name of its image when records other than this one may share it (a JSONL file's)."""

    id: str
    image: str | None
    text: str | None
    problem: str | None = None
    image_name: str | None = None

    @property
    def split_key(self) -> str:
        """What decides its split: its image's name, so all captions of one image share it."""
        return self.id if self.image_name is None else self.image_name


def clean_caption(text: str) -> str:
    """A caption as read: without surrounding whitespace (a .txt file's final newline, spaces
    around a JSONL value) and with CRLF line ends as LF, as a generation prompt is written."""
    return text.replace("\r\n", "\n").strip()


def _caption_problem(text: str) -> str | None:
    """'empty_caption' or 'non_utf8_caption' (lone surrogates from undecodable bytes), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "non_utf8_caption"
    return None if text.strip() else "empty_caption"


def _normpath(path: str) -> str:
    """`path` without `.`, `..` and doubled separators (a bucket's scheme kept)."""
    if fs.is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.normpath(path)


def _image_name(folder: str, image: str) -> tuple[str, str] | None:
    """(name, path) of a JSONL line's image: the name is its normalised path relative to the
    JSONL's `folder` when it is inside it, else its normalised absolute path; the path is
    where it is read. None for a relative path that leads out of `folder` (`../x.png`)."""
    if fs.is_remote(image) or os.path.isabs(image):
        path = _normpath(image)
        inside = path.startswith(folder.rstrip("/") + "/")
        return (path[len(folder.rstrip("/")) + 1:] if inside else path), path
    name = posixpath.normpath(image)
    if name == ".." or name.startswith("../"):
        return None
    return name, _normpath(fs.join(folder, name))


def jsonl_records(path: str) -> Iterator[Record]:
    """Records of a JSONL file; blank lines skipped. A record's image is named by its
    normalised path (`_image_name`: `a.png`, `./a.png` and its absolute path are one image),
    which decides its split; its id is that name, '#', and a hash of its caption, so both
    hold when lines are added or removed. A line repeating an earlier record is a
    `duplicate_record`, a line that is not a record `bad_record`, a relative image path
    leading out of the file's folder `image_outside_folder`, each under the id 'line<N>'
    (N 1-based)."""
    folder = _normpath(os.path.dirname(fs.abspath(path)))
    seen = set()
    with fs.open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            # A byte-order mark (as some editors save UTF-8) is not part of the first line.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8",
                              errors="surrogateescape").strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                    or not isinstance(entry.get("text"), str):
                yield Record(f"line{number}", None, None, "bad_record")
                continue
            named = _image_name(folder, entry["image"])
            if named is None:
                yield Record(f"line{number}", None, None, "image_outside_folder")
                continue
            (name, image), text = named, clean_caption(entry["text"])
            caption_hash = zlib.crc32(text.encode("utf-8", "surrogatepass"))
            record_id = _printable(f"{name}#{caption_hash:08x}")
            if record_id in seen:
                yield Record(f"line{number}", None, None, "duplicate_record")
                continue
            seen.add(record_id)
            yield Record(record_id, image, text, _caption_problem(text), _printable(name))


_JSONL_ID = re.compile(r"(.*)#[0-9a-f]{8}")


def image_of(record_id: str) -> str:
    """The image a prepared record's id names: a JSONL record's image name (its id without
    the caption hash), a folder record's path (its id: a name ending in an image suffix,
    which the caption hash's form never matches). The records of one image share it."""
    match = _JSONL_ID.fullmatch(record_id)
    return match.group(1) if match else record_id


def _printable(record_id: str) -> str:
    """`record_id` with the bytes a file name held that are not UTF-8 (decoded by Python as
    lone surrogates, which no TFDS string feature can hold) written as `\\xNN`."""
    return record_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _stem_key(path: str) -> str:
    """Path without suffix, lower-cased: `Cat.JPG` and `cat.TXT` pair up."""
    return os.path.splitext(path)[0].lower()


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _files_under(root: str) -> list[str]:
    """Every file below `root`, as sorted paths relative to it ('/'-separated)."""
    root = root.rstrip("/")
    out = []
    for folder, _, names in fs.walk(root):
        below = folder.rstrip("/")[len(root):].strip("/")
        out += [f"{below}/{n}" if below else n for n in names]
    return sorted(out)


def folder_records(root: str) -> Iterator[Record]:
    """Records of a folder: each image with its same-stem .txt (any case); ids are paths
    relative to `root`. Captions without an image come out as 'missing_image'."""
    files = _files_under(root)
    present = set(files)
    images = [p for p in files if _suffix(p) in IMAGE_SUFFIXES]
    stems = {_stem_key(p) for p in images}
    captions: dict[str, str] = {}
    for caption in (p for p in files if _suffix(p) == ".txt"):
        captions.setdefault(_stem_key(caption), caption)  # Case variants: the first wins.
    for image in images:
        exact = os.path.splitext(image)[0] + ".txt"
        sidecar = exact if exact in present else captions.get(_stem_key(image))
        record_id = _printable(image)
        if sidecar is None:
            yield Record(record_id, fs.join(root, image), None, "missing_caption")
            continue
        try:
            text = clean_caption(fs.read_bytes(fs.join(root, sidecar)).decode("utf-8-sig"))
        except UnicodeDecodeError:
            yield Record(record_id, fs.join(root, image), None, "non_utf8_caption")
            continue
        yield Record(record_id, fs.join(root, image), text, _caption_problem(text))
    for caption in (p for p in files if _suffix(p) == ".txt" and _stem_key(p) not in stems):
        yield Record(_printable(caption), None, None, "missing_image")


def check_kind(source: str) -> None:
    """Refuses a source that is neither a folder nor a JSONL file (a .csv, a .tar, ...)."""
    if not fs.isdir(source) and _suffix(source) not in JSONL_SUFFIXES:
        raise UserInputError(f"user data source {source!r} is neither a folder nor a .jsonl "
                             "file; give one of those (one {\"image\": path, \"text\": "
                             "caption} a line, or images beside same-stem .txt captions).")


def records(source: str) -> Iterator[Record]:
    """Records of a JSONL file or a folder, by what `source` is."""
    check_kind(source)
    return folder_records(source) if fs.isdir(source) else jsonl_records(source)


_REMOTE_FINGERPRINTS: dict[str, str] = {}  # A bucket is listed once per process.


def source_fingerprint(source: str) -> str:
    """A hash of what the source holds, to tell a prepared copy that is out of date: a
    folder's file names and, on the local disk, their sizes and modification times; a JSONL
    file's size (and local modification time) and, on the local disk, the size and
    modification time of every image its lines name (or that it is missing). Not seen: in a
    bucket, a file rewritten under the same name, an image a JSONL line names, or a change
    made while this process runs (a bucket is listed once per process)."""
    if source in _REMOTE_FINGERPRINTS:
        return _REMOTE_FINGERPRINTS[source]
    digest = hashlib.sha1()
    local = not fs.is_remote(source)
    for rel in _files_under(source) if fs.isdir(source) else [""]:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if local or not rel:  # In a bucket, a folder's listing alone (one call).
            size, mtime = fs.size_and_mtime(fs.join(source, rel) if rel else source)
            digest.update(f"{size} {mtime}\0".encode())
    if local and not fs.isdir(source):  # The images its lines name: added, edited, gone.
        for record in jsonl_records(source):
            if record.image:
                stat = fs.size_and_mtime(record.image) if fs.isfile(record.image) else "missing"
                digest.update(f"{record.image} {stat}\0".encode("utf-8", "surrogateescape"))
    if not local:
        _REMOTE_FINGERPRINTS[source] = digest.hexdigest()[:16]
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- images


def load_image(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8[image_size, image_size, 3], None), or (None, reason) for an unusable file."""
    if not fs.isfile(path):
        return None, "missing_image"
    try:
        with fs.open(path, "rb") as f, Image.open(f) as image:
            if min(image.size) < image_size:  # Checked before decoding: the header says.
                return None, "image_too_small"
            image.load()
            upright = ImageOps.exif_transpose(image)
            if min(upright.size) < image_size:
                return None, "image_too_small"
            square = ImageOps.fit(pil_rgb(upright), (image_size, image_size),
                                  method=Image.Resampling.BICUBIC)
            return np.asarray(square, dtype=np.uint8), None
    except Image.DecompressionBombError:
        return None, "decompression_bomb"
    except UnsupportedImageError:
        return None, "unsupported_image_mode"
    except UnidentifiedImageError:
        return None, "corrupt_image"
    except Exception as error:  # noqa: BLE001 - any decoder failure on a user's file is data, not a bug
        if "truncated" in str(error).lower():
            return None, "truncated_image"
        logging.info("Unreadable image %s: %s", path, error)
        return None, "corrupt_image"


# ----------------------------------------------------------------------------- report


class Report:
    """Counts of kept and rejected records, with up to MAX_REPORTED_IDS ids per reason."""

    def __init__(self, source: str, fingerprint: str = ""):
        self.source, self.fingerprint = source, fingerprint
        self.ok = 0
        self.kept: collections.Counter[str] = collections.Counter()  # Per split.
        self.counts: collections.Counter[str] = collections.Counter()
        self.ids: dict[str, list[str]] = collections.defaultdict(list)

    def reject(self, record_id: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.ids[reason]) < MAX_REPORTED_IDS:
            self.ids[reason].append(record_id)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "source_fingerprint": self.fingerprint,
            "total": self.ok + sum(self.counts.values()),
            "ok": self.ok,
            "splits": {split: self.kept[split] for split in SPLITS},
            "rejected": {reason: self.counts[reason] for reason in REASONS},
            "rejected_ids": {reason: self.ids[reason] for reason in REASONS if self.ids[reason]},
        }

    def write(self, folder: str) -> str:
        path = fs.join(str(folder), REPORT_NAME)
        fs.write_text(path, json.dumps(self.as_dict(), indent=2, ensure_ascii=False))
        return path

    def summary(self) -> str:
        bad = ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items())) or "none"
        return (f"{self.source}: kept {self.ok} of {self.ok + sum(self.counts.values())}; "
                f"rejected: {bad}")


# ----------------------------------------------------------------------------- splits


def held_out_share(record_id: str) -> float:
    """A fixed number in [0, 1) for a record id (CRC32): below the fraction -> validation."""
    return zlib.crc32(record_id.encode("utf-8", errors="surrogateescape")) / 2**32


def split_records(all_records: Sequence[Record], validation_fraction: float,
                  image_size: int) -> dict[str, list[Record]]:
    """{"train": [...], "validation": [...]}, by the `held_out_share` of each record's
    `split_key` (its image: the captions of one image share a split).

    When no usable record falls under the fraction (a small source), the image of the
    usable record with the lowest share is held out too, so the trainer's evaluation always
    has data (if a usable record of another image stays in train; only then are images
    opened here). Its records are the only ones that can change split when data is added:
    they go back to train once an added usable record falls under the fraction, or once an
    added image's usable record has a lower share (that image is then held out instead).
    """
    def usable(record: Record) -> bool:
        return record.problem is None and load_image(record.image, image_size)[1] is None

    held = {r.split_key for r in all_records
            if held_out_share(r.split_key) < validation_fraction}
    if not any(usable(r) for r in all_records if r.split_key in held):
        ranked = (r for r in sorted(all_records, key=lambda r: held_out_share(r.split_key))
                  if r.split_key not in held and usable(r))
        first = next(ranked, None)
        if first is not None and any(r.split_key != first.split_key for r in ranked):
            held.add(first.split_key)
    return {"train": [r for r in all_records if r.split_key not in held],
            "validation": [r for r in all_records if r.split_key in held]}


# ----------------------------------------------------------------------------- builder


class UserImageText(tfds.core.GeneratorBasedBuilder):
    """A user's image-text pairs, split into 'train' and a held-out 'validation'."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: JSONL or folder sources, report.json of rejects.",
        "1.1.0": "A deterministic validation split; small images and decompression bombs "
                 "rejected; caption files matched whatever their case.",
        "1.2.0": "JSONL ids from the image path and a hash of the caption (not the line "
                 "number), repeated lines counted as duplicate_record, a UTF-8 byte-order "
                 "mark read; file names that are not UTF-8 kept in the ids as \\xNN.",
        "1.3.0": "JSONL records split by their image (all its captions in one split), image "
                 "paths normalised (./a.png is a.png) and kept inside the file's folder "
                 "(image_outside_folder); captions stripped of surrounding whitespace, CRLF "
                 "as LF; float and beyond-16-bit images refused (unsupported_image_mode).",
    }

    def __init__(self, *, source: str | os.PathLike | None = None, image_size: int = 256,
                 validation_fraction: float = 0.05, config: UserDataConfig | None = None,
                 **kwargs):
        """Pass `source` (+ `image_size`, `validation_fraction`), or a ready `config`; other
        kwargs go to TFDS (`data_dir`, `version`)."""
        if config is None:
            if source is None:
                raise ValueError("UserImageText needs source= (a .jsonl file or an image folder) "
                                 "or config=make_user_config(...).")
            config = make_user_config(source, image_size, validation_fraction)
        elif not isinstance(config, UserDataConfig):
            raise ValueError(
                f"UserImageText config must be a UserDataConfig (see make_user_config), "
                f"got {config!r}."
            )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description="User image-text pairs; see report.json for rejected records.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(n, n, 3)),
                "text": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the data is already local
        config = self.builder_config
        fingerprint = source_fingerprint(config.source)  # Before reading: a later edit shows.
        splits = split_records(list(records(config.source)), config.validation_fraction,
                               config.image_size)
        # One report over both splits, rewritten after each.
        report = Report(config.source, fingerprint)
        return {split: self._generate_examples(splits[split], split, report) for split in SPLITS}

    def _generate_examples(self, split_records: Sequence[Record], split: str, report: Report):
        for record in split_records:
            if record.problem is not None:
                report.reject(record.id, record.problem)
                continue
            pixels, problem = load_image(record.image, self.builder_config.image_size)
            if problem is not None:
                report.reject(record.id, problem)
                continue
            report.ok += 1
            report.kept[split] += 1
            yield record.id, {"id": record.id, "image": pixels, "text": record.text}
        logging.info("User data report after %s: %s", split, report.summary())
        if report.kept[split] == 0:
            raise UserInputError(
                f"no usable image-text pairs for the {split} split of {report.source}: "
                f"{report.summary()}; add usable pairs"
                + (" (holding one out needs usable pairs of two images) or raise "
                   "validation_fraction."
                   if split == "validation" else "."))
        if sum(report.counts.values()):
            logging.warning("Rejected records from %s: %s (details in %s)", report.source,
                            report.summary(), REPORT_NAME)
        report.write(self.data_dir)


@gin.configurable
def user_data_builder(source: str | os.PathLike, image_size: int = 256, data_dir: str | None = None,
                      *, validation_fraction: float = 0.05, overwrite: bool = False,
                      prepare: bool = True) -> UserImageText:
    """A prepared UserImageText builder, built with no network access if not yet built.

    A prepared copy is reused while the source is as it was (`source_fingerprint`); after
    the source changed, it is refused with an error, or rebuilt with `overwrite=True` (once:
    the rebuilt copy is then current, so the preprocessing workers that call this again
    reuse it). `prepare=False`: the builder as configured, nothing read or built (for
    checks before any work, e.g. its image size).
    """
    builder = UserImageText(source=source, image_size=image_size,
                            validation_fraction=validation_fraction, data_dir=data_dir)
    if not prepare:
        return builder
    config = offline_download_config()
    if fs.exists(fs.join(str(builder.data_path), REPORT_NAME)):
        prepared = read_report(builder).get("source_fingerprint")
        if prepared != source_fingerprint(builder.builder_config.source):
            if not overwrite:
                raise UserInputError(
                    f"user data {builder.builder_config.source!r} changed since it was prepared "
                    f"in {builder.data_path}: rerun with "
                    "--gin.user_data_builder.overwrite=True to prepare it again (or give "
                    "user_data_builder.data_dir another folder), and preprocess it into a new "
                    "MODEL_DIR (or delete the one made from the earlier data to start over): "
                    "preprocessing refuses to mix the changed data with what it made before.")
            config = dataclasses.replace(
                config, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
    builder.download_and_prepare(download_config=config)
    return builder


def check_outside(model_dir: str, mode: str) -> None:
    """Refuses a run's MODEL_DIR that is the user's data folder gin binds
    (`user_data_builder.source`) or lies inside it: the run's config.gin and outputs would
    change the folder, so every later run would find the data "changed since it was
    prepared" (and preprocessing's shards would be read back as the user's own files). For
    a run mode's `preflight`, before anything is written."""
    source = gin.get_bindings(user_data_builder).get("source")
    if not source or not fs.isdir(str(source)):
        return  # A JSONL file names its images; the folder beside it is not read whole.
    if fs.within(model_dir, str(source)):
        raise UserInputError(
            f"{mode} MODEL_DIR {model_dir!r} is or lies inside the user data folder "
            f"{str(source)!r} (USER_DATA): what the run writes would become part of the data "
            f"it reads. Give the {mode} run a folder outside it.")


def read_report(builder: UserImageText) -> dict:
    """The report.json of a prepared builder."""
    return json.loads(fs.read_bytes(fs.join(str(builder.data_path), REPORT_NAME)).decode("utf-8"))


@gin.configurable
def load_user_data(source: str | os.PathLike, image_size: int = 256, data_dir: str | None = None,
                   *, split: str = "train", validation_fraction: float = 0.05,
                   overwrite: bool = False, shuffle_files: bool = False) -> tf.data.Dataset:
    """A split of `source` as a tf.data.Dataset of {id, image, text}, built if needed."""
    builder = user_data_builder(source, image_size, data_dir,
                                validation_fraction=validation_fraction, overwrite=overwrite)
    return builder.as_dataset(split=split, shuffle_files=shuffle_files)
