"""The `sft_preprocess` run mode: SFT examples -> tokenized shards, one folder per family.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/sft_preprocess.gin \
        --gin.MODEL_DIR="'runs/demo/sft_data'"

Pretraining shards hold `caption <break> image` documents; SFT examples need the VQ
codes of images the corpus never stored (edited scenes, condition maps, masks, rendered
text), so this pass renders each family's example from its scene (or reads it from a
public-format adapter, `sft_formats.py`), VQ-encodes every image with the same image
tokenizer, and writes `MODEL_DIR/{family}/{split}-NNNNN-of-MMMMM.tfrecord` in the shard
format of `shards.py` (`ids` = the whole `instruction <break> inputs <break> output`
example, no neighbors). It reuses preprocessing's Beam pipeline: one shard is the unit
of work, written by atomic rename with a stats file, so a rerun skips finished shards.
`MODEL_DIR/plan.json` records what the shards are made of (the source, and the content of
a public-format source's files; each family's and split's shards and records, seq_len,
families; `shards.check_plan`): a rerun of another plan, or after the source's files
changed, into the same folder is refused, since its shards would be read beside the
earlier ones. A source split other than `splits` names is refused, not left out; a split
of `splits` the source has no example of is logged (an `sft` run refuses SFT data without
the split it evaluates on).

The vocabulary is the pretraining data's (`vocab_dir`), copied to `MODEL_DIR/vocab` so
the SFT folder is self-contained; a folder made with another vocabulary is refused.
`MODEL_DIR/manifest.json` counts, per family and split, what was read, written, and
skipped by reason (with sample ids), and the shortest and longest examples (`min_tokens`,
`max_tokens`), so that a task refuses a training `seq_len` its longest examples do not fit
(`check_fits`) instead of its length filter dropping them (or, when none fits, repeating
an empty dataset forever). Nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterator, Sequence

import gin
import numpy as np
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.data import preprocess, sft_examples, sft_prompts, shapes, shard_state, shards
from cm3leon_jax.data.augment import AugmentConfig
from cm3leon_jax.data.sft_examples import SftExample
from cm3leon_jax.errors import MissingInputError, UserInputError
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary, vocabulary_files

# Images whose codes a worker keeps (a digest and the codes: 4 KB at 1024 codes); past
# it, it starts over.
KNOWN_IMAGES = 50_000


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record a source could not turn into an example, and why."""

    doc_id: str
    reason: str


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SyntheticSftSource:
    """Every family's example on each scene of the built-in corpus (the same scenes as
    `synthetic_tfds` with this seed and image size); VQA asks `vqa_questions` questions
    of each training scene (None: all it has, 5-11), one of the others (what the
    evaluation asks)."""

    image_size: int = 32
    split_sizes: dict = dataclasses.field(
        default_factory=lambda: {"train": 2000, "validation": 200, "test": 200})
    seed: int = 0
    families: tuple[str, ...] = sft_prompts.FAMILIES
    vqa_questions: int | None = None

    def __post_init__(self):
        if self.image_size < shapes.MIN_IMAGE_SIZE:  # Before Beam: its workers would raise.
            raise UserInputError(
                f"SyntheticSftSource.image_size={self.image_size}: the built-in corpus draws "
                f"its scenes at {shapes.MIN_IMAGE_SIZE} px or more (the image tokenizer "
                "resizes them to its own size); for an image tokenizer of another size, bind "
                "the corpus' own size here (sft_preprocess.gin's IMAGE_SIZE) or give a source "
                "of your own images (sft_formats.FormatSource).")

    def split_names(self) -> list[str]:
        """The source's splits (`sft_preprocess` refuses one it does not plan)."""
        return list(self.split_sizes)

    def identity(self) -> dict:
        """What decides the examples (recorded in plan.json)."""
        return {"synthetic": dataclasses.asdict(self)}

    def num_examples(self, split: str, family: str) -> int:
        """Scenes (the unit of sharding; a VQA scene may give several examples)."""
        if split not in self.split_sizes:
            raise UserInputError(
                f"SyntheticSftSource.split_sizes={self.split_sizes} has no {split!r} split: "
                "give its size (0 for none), or leave it out of sft_preprocess.splits.")
        return self.split_sizes[split] if family in self.families else 0

    def read(self, split: str, family: str, start: int, stop: int
             ) -> Iterator[SftExample | Skipped]:
        questions = self.vqa_questions if split == "train" else 1
        for index in range(start, stop):
            yield from sft_examples.corpus_examples(self.seed, split, index, self.image_size,
                                                    family, vqa_questions=questions)

    def report(self) -> dict | None:
        return None


@dataclasses.dataclass(frozen=True)
class SftShardSpec:
    family: str
    split: str
    index: int
    num_shards: int
    start: int
    stop: int


def plan_shards(source: Any, families: Sequence[str], splits: Sequence[str],
                docs_per_shard: int) -> list[SftShardSpec]:
    """Each family's split in shards of about `docs_per_shard` (none for an empty one)."""
    shards.slices(0, docs_per_shard, "sft_preprocess.docs_per_shard")  # Before any read.
    specs = []
    for family in families:
        for split in splits:
            n = source.num_examples(split, family)
            if not n:
                continue
            parts = shards.slices(n, docs_per_shard, "sft_preprocess.docs_per_shard")
            specs += [SftShardSpec(family, split, i, len(parts), start, stop)
                      for i, (start, stop) in enumerate(parts)]
    return specs


def shard_files(out_dir: str, spec: SftShardSpec) -> shard_state.ShardFiles:
    """An SFT shard's files: a pretraining shard's (records, stats), in its family's folder."""
    return shard_state.ShardFiles.of(os.path.join(out_dir, spec.family), spec)


def check_splits(source: Any, splits: Sequence[str]) -> None:
    """Raises UserInputError when the source has a split `splits` does not plan (e.g.
    "val"): its examples would be left out without a word."""
    names = source.split_names() if hasattr(source, "split_names") else ()
    unknown = [name for name in names if name not in splits]
    if unknown:
        raise UserInputError(
            f"the source's split {unknown[0]!r} is not one of sft_preprocess.splits "
            f"{tuple(splits)}: name its examples one of those (the SFT tasks read train, "
            "validation and test), or leave it out of the source.")


def left_out_families(source: Any, families: Sequence[str], splits: Sequence[str]
                      ) -> dict[str, int]:
    """{family: records} the source holds of the families `families` does not plan (a
    selection from a source of several formats): said in the log and the manifest, since
    they are neither written nor counted as skipped."""
    names = source.family_names() if hasattr(source, "family_names") else ()
    out = {name: sum(source.num_examples(split, name) for split in splits)
           for name in names if name not in families}
    if out:
        logging.warning("sft_preprocess: the source's %s records are left out "
                        "(sft_preprocess.families=%s)", out, tuple(families))
    return out


def check_plan(model_dir: str, source: Any, specs: Sequence[SftShardSpec], *,
               seq_len: int, families: Sequence[str], image_tokenizer=None) -> None:
    """`shards.check_plan` of the SFT folder: the source's identity and the content of its
    files (`source.fingerprint()`, where it has one), the shards and records of each
    `family/split`, the seq_len (which examples were skipped as too long), the families and
    the image tokenizer that made the codes (its `fingerprint`). A plan.json from before the
    content or the tokenizer was recorded is accepted. Without plan.json, a shard file of
    any family that this plan does not write is refused."""
    identity = source.identity() if hasattr(source, "identity") else None
    plan = {"source": identity,
            "shards": shards.plan_layout(specs, key=lambda s: f"{s.family}/{s.split}"),
            "seq_len": seq_len, "families": list(families)}
    optional = []
    if image_tokenizer is not None:
        optional.append("sft_preprocess.image_tokenizer_fn")
        plan[optional[-1]] = {"config_and_weights": image_tokenizer.fingerprint}
    if hasattr(source, "fingerprint"):
        optional.append("source_content")
        plan["source_content"] = source.fingerprint()
        _check_source_content(model_dir, plan["source_content"])
    patterns = [shards.shard_pattern(os.path.join(model_dir, family), "*")
                for family in sft_prompts.FAMILIES]
    shards.check_plan(model_dir, plan, [shard_files(model_dir, s).records for s in specs], patterns,
                      who="sft_preprocess", optional=optional,
                      settings="sft_preprocess.docs_per_shard, seq_len, families or "
                               "image_tokenizer_fn")


def _check_source_content(model_dir: str, content: str) -> None:
    """Raises UserInputError when plan.json records other source content than `content`:
    the finished shards hold the files as they were, and a rerun would keep them."""
    earlier = shards.read_plan(model_dir).get("source_content")
    if earlier is not None and earlier != content:
        raise UserInputError(
            f"the files sft_preprocess.source reads changed since {model_dir!r} was made from "
            f"them (content fingerprint {earlier} then, {content} now): its finished shards "
            "hold the earlier content and would be kept. Give sft_preprocess a new MODEL_DIR "
            "(or delete this one).")


def warn_missing_splits(specs: Sequence[SftShardSpec], splits: Sequence[str]) -> list[str]:
    """Logs a warning naming the `splits` that no planned shard holds (the source has no
    example of them); returns them. The `sft` run mode evaluates on train.eval_split
    ('validation' by default) and refuses SFT data without it."""
    missing = [split for split in splits if not any(s.split == split for s in specs)]
    if missing:
        why = (" An sft run evaluates on the 'validation' split (train.eval_split) and "
               "refuses SFT data without it: give the source a 'validation' split (e.g. "
               "FormatSource.splits={'train': [...], 'validation': [...]})."
               if "validation" in missing else "")
        logging.warning("sft_preprocess: the source has no %s examples.%s",
                        " or ".join(repr(s) for s in missing), why)
    return missing


def is_done(spec: SftShardSpec, out_dir: str) -> bool:
    """Whether the shard's records and stats are written for this slice of the source (a
    stats file of another slice, or from before slices were recorded, is not done)."""
    path = shard_files(out_dir, spec).stats
    return fs.exists(path) and fs.read_json(path).get("range") == [spec.start, spec.stop]


def _image_key(pixels: Any) -> tuple:
    array = np.ascontiguousarray(pixels)
    return array.shape, array.dtype.str, hashlib.sha256(array.tobytes()).digest()


def encode_examples(examples: list[SftExample], vocab: MultimodalVocabulary, image_tokenizer,
                    known: dict | None = None) -> list[np.ndarray]:
    """The examples' ids, with the images not in `known` VQ-encoded in one call.

    `known` ({image key: codes}, updated) carries codes across calls: most families show
    the scene's own image (as input or output) and a VQA scene's questions share it, so a
    worker that keeps it encodes each image once."""
    known = {} if known is None else known
    pixels = []
    for ex in examples:
        pixels += ex.prompt.images()
        if ex.prompt.output == "image":
            pixels.append(ex.output)
    keys = [_image_key(p) for p in pixels]
    new: dict = {}
    for i, key in enumerate(keys):
        if key not in known:
            new.setdefault(key, i)
    if new:
        known.update(zip(new, image_tokenizer.encode([pixels[i] for i in new.values()])))
    codes = (known[k] for k in keys)
    out = []
    for ex in examples:
        prompt = ex.prompt.map_images(lambda _: next(codes))
        output = next(codes) if prompt.output == "image" else ex.output
        out.append(sft_prompts.example_ids(prompt, output, vocab))
    return out


@dataclasses.dataclass
class SftShardWorker:
    """What each Beam worker runs per shard (see `preprocess.ShardWorker`)."""

    source: Any
    image_tokenizer_fn: Callable
    out_dir: str
    batch_size: int
    max_doc_tokens: int
    gin_config: str = ""

    def setup(self) -> None:
        if self.gin_config and not gin.config_str():
            gin.parse_config(self.gin_config)
        self._vocab = MultimodalVocabulary(os.path.join(self.out_dir, "vocab"))
        self._images = preprocess._image_tokenizer(self.image_tokenizer_fn)  # noqa: SLF001
        self._known: dict = {}  # codes of the images this worker has encoded

    def __call__(self, spec: SftShardSpec) -> dict:
        skipped: dict[str, list[str]] = collections.defaultdict(list)
        lengths: list[int] = []
        longest = None  # of the written examples

        def batch_docs(batch):
            nonlocal longest
            if len(self._known) > KNOWN_IMAGES:
                self._known.clear()
            for ex, ids in zip(batch, encode_examples(batch, self._vocab, self._images,
                                                      self._known)):
                lengths.append(int(ids.size))
                if ids.size > self.max_doc_tokens:
                    skipped["document_too_long"].append(ex.doc_id)
                    continue
                longest = max(longest or 0, int(ids.size))
                yield shards.TokenizedDocument(ex.doc_id, ids)

        read = 0

        def docs():
            nonlocal read
            batch = []
            for ex in self.source.read(spec.split, spec.family, spec.start, spec.stop):
                read += 1
                if isinstance(ex, Skipped):
                    skipped[ex.reason].append(ex.doc_id)
                    continue
                batch.append(ex)
                if len(batch) == self.batch_size:
                    yield from batch_docs(batch)
                    batch = []
            if batch:
                yield from batch_docs(batch)

        files = shard_files(self.out_dir, spec)
        final = files.records
        fs.makedirs(os.path.dirname(final))
        with fs.atomic_write(final) as tmp:
            written = shards.write_records(docs(), tmp)
        # The shortest example (written or not) and the longest written: which training
        # lengths fit them (`check_fits`). `range`: the slice these stats are of (`is_done`).
        stats = {"split": spec.split, "written": written, "read": read,
                 "skipped": dict(skipped), "min_tokens": min(lengths, default=None),
                 "max_tokens": longest, "range": [spec.start, spec.stop]}
        fs.write_json(files.stats, stats)
        counters = {f"{spec.family}/documents": written}
        counters.update({f"{spec.family}/{r}": len(ids) for r, ids in skipped.items()})
        return {**stats, "counters": counters}


def copy_vocabulary(vocab_dir: str, out_dir: str) -> MultimodalVocabulary:
    """`vocab_dir` copied to `out_dir/vocab`; an existing different copy is an error."""
    target = os.path.join(out_dir, "vocab")
    files = vocabulary_files(vocab_dir)
    for name in files:
        if not fs.exists(os.path.join(vocab_dir, name)):
            raise MissingInputError(f"sft_preprocess.vocab_dir={vocab_dir!r} has no {name}: "
                                    "give the vocab/ folder of the pretraining data (or of "
                                    "an import_weights folder).")
    if fs.exists(os.path.join(target, "layout.json")):
        if vocabulary_files(target) != files or not all(
                fs.read_bytes(os.path.join(vocab_dir, n)) == fs.read_bytes(
                    os.path.join(target, n)) for n in files):
            raise UserInputError(f"{out_dir!r} was made with another vocabulary than "
                                 f"{vocab_dir!r}; use a new output folder for a new vocabulary.")
    else:
        fs.makedirs(target)
        for name in files:
            fs.copy(os.path.join(vocab_dir, name), os.path.join(target, name))
    return MultimodalVocabulary(target)


def manifest(specs: Sequence[SftShardSpec], out_dir: str, seq_len: int) -> dict:
    """Per family, `preprocess.manifest`'s counts of its shards, each split's shortest
    example (`min_tokens`, written or too long) and its longest written one (`max_tokens`)."""
    families: dict = {}
    for family in dict.fromkeys(s.family for s in specs):
        mine = [s for s in specs if s.family == family]
        families[family] = preprocess.manifest(mine, os.path.join(out_dir, family))["splits"]
        for split, counts in families[family].items():
            stats = [fs.read_json(shard_files(out_dir, s).stats)
                     for s in mine if s.split == split]
            shortest = [x["min_tokens"] for x in stats if x.get("min_tokens") is not None]
            longest = [x["max_tokens"] for x in stats if x.get("max_tokens") is not None]
            counts["min_tokens"] = min(shortest) if shortest else None
            counts["max_tokens"] = max(longest) if longest else None
    return {"families": families, "shards": len(specs), "seq_len": seq_len}


def _family_counts(data_dir: str, family: str) -> dict[str, dict]:
    """{split: counts} of `family` in the SFT folder's manifest ({} without one)."""
    path = os.path.join(data_dir, "manifest.json")
    return fs.read_json(path)["families"].get(family, {}) if fs.exists(path) else {}


def check_has_examples(data_dir: str, family: str, split: str) -> None:
    """Raises UserInputError when `sft_preprocess` wrote no example of the family's split
    (a dataset of none would be repeated forever), naming why each was skipped."""
    counts = _family_counts(data_dir, family).get(split)
    if counts is None or counts["written"]:
        return
    manifest_seq_len = fs.read_json(os.path.join(data_dir, "manifest.json")).get("seq_len")
    too_long = counts["skipped"].get("document_too_long", 0)
    why = (f"all {too_long} were longer than sft_preprocess.seq_len={manifest_seq_len} allows "
           f"(the shortest has {counts.get('min_tokens')} tokens)"
           if too_long == counts["read"] else f"skipped: {counts['skipped']}")
    raise UserInputError(
        f"SFT family {family!r} has no {split!r} example in {data_dir!r}: of {counts['read']} "
        f"read, {why}. Rerun sft_preprocess into a new folder with a larger seq_len (and "
        "train with the same train.seq_len), or with smaller images.")


def check_fits(config: AugmentConfig, *, data_dir: str, family: str) -> None:
    """Raises UserInputError when a written example of one of the family's splits does not
    fit `config.budget` (the training seq_len less the CM3 reserve): the length filter
    would drop it without a word (and, when none fits, leave the dataset empty). Refusing
    is simpler and safer than counting what a filter inside the input pipeline dropped.
    A manifest from before `max_tokens` was recorded is taken at its seq_len's budget."""
    counts = _family_counts(data_dir, family)
    if not counts:
        return
    seq_len = fs.read_json(os.path.join(data_dir, "manifest.json")).get("seq_len")
    written_budget = AugmentConfig(seq_len=seq_len).budget if seq_len else None
    longest = {split: c.get("max_tokens", written_budget) for split, c in counts.items()
               if c["written"]}
    over = {split: n for split, n in longest.items() if n is not None and n > config.budget}
    if over:
        split, n = max(over.items(), key=lambda kv: kv[1])
        raise UserInputError(
            f"SFT family {family!r} has {split!r} examples of up to {n} tokens, longer than "
            f"train.seq_len={config.seq_len} allows ({config.budget} fit beside the CM3 "
            "reserve): training would drop them without a word. Its folder was preprocessed "
            f"with sft_preprocess.seq_len={seq_len}: train with train.seq_len >= "
            f"{n + config.seq_len - config.budget}, or rerun sft_preprocess with "
            f"seq_len={config.seq_len} into a new folder.")


@gin.configurable(denylist=["model_dir"])
def sft_preprocess(model_dir: str, vocab_dir: str = gin.REQUIRED, source: Any = gin.REQUIRED,
                   image_tokenizer_fn: Callable = gin.REQUIRED,
                   families: Sequence[str] = sft_prompts.FAMILIES,
                   splits: Sequence[str] = ("train", "validation", "test"),
                   docs_per_shard: int = 1000, batch_size: int = 32, seq_len: int = 4096,
                   runner: str = "DirectRunner", pipeline_options: Sequence[str] = ()) -> dict:
    """Tokenizes `source`'s SFT examples into `model_dir`; returns the manifest.

    Args:
      model_dir: the SFT data folder (what `sft_data_dirs` points at).
      vocab_dir: the pretraining data's `vocab/` (the base model's vocabulary).
      source: `SyntheticSftSource()` or a public-format source (`sft_formats.py`); its
        split names must be among `splits`.
      image_tokenizer_fn: returns the pretraining data's `ImageTokenizer`.
      families: which families to write. splits: which splits.
      docs_per_shard, batch_size, runner, pipeline_options: as in `preprocess`.
      seq_len: the training length; longer examples are skipped as document_too_long.
    """
    unknown = [f for f in families if f not in sft_prompts.FAMILIES]
    if unknown:
        raise UserInputError(f"sft_preprocess.families: unknown {unknown}; the families are "
                             f"{sft_prompts.FAMILIES}.")
    check_splits(source, splits)
    left_out = left_out_families(source, families, splits)
    vocab = copy_vocabulary(vocab_dir, model_dir)
    images = preprocess._image_tokenizer(image_tokenizer_fn)  # noqa: SLF001
    if vocab.layout.image_length != images.codes_per_image:
        raise UserInputError(f"{vocab_dir} expects {vocab.layout.image_length} codes per image but "
                             f"the image tokenizer gives {images.codes_per_image}: use the "
                             "tokenizer the pretraining data was made with.")
    shards.check_image_tokenizer(vocab_dir, images, "sft_preprocess.image_tokenizer_fn")
    if hasattr(source, "with_image_size"):  # Boxes are written in the tokenizer's frame.
        source = source.with_image_size(images.image_size)
    specs = plan_shards(source, families, splits, docs_per_shard)
    warn_missing_splits(specs, splits)
    check_plan(model_dir, source, specs, seq_len=seq_len, families=families,
               image_tokenizer=images)
    todo = [s for s in specs if not is_done(s, model_dir)]
    logging.info("sft_preprocess: %d shards, %d already done", len(specs),
                 len(specs) - len(todo))
    if todo:
        worker = SftShardWorker(source, image_tokenizer_fn, model_dir, batch_size,
                                AugmentConfig(seq_len=seq_len).budget, gin.config_str())
        preprocess.run_pipeline(todo, worker, runner, pipeline_options, stage="SftTokenize")
    result = manifest(specs, model_dir, seq_len)
    result["source_report"] = source.report()
    if left_out:
        result["left_out_families"] = left_out
    shards.write_manifest(model_dir, result)
    return result


@gin.configurable
def sft_vocab_dir(data_dir: str = gin.REQUIRED) -> str:
    """The vocabulary folder of a pretraining data folder (`data_dir/vocab`)."""
    return os.path.join(data_dir, "vocab")
