"""The `preprocess` run mode: a source's image-text pairs -> tokenized shards.

An Apache Beam pipeline (DirectRunner here; Dataflow or Flink at scale, chosen
by `preprocess.runner` and `preprocess.pipeline_options`). The unit of work is
one output shard, a contiguous slice of a source split:

    Create(shard specs not yet done) | Reshuffle | ParDo(RunShard(ShardWorker))

`ShardWorker` reads its slice, checks every pair, VQ-encodes the images in
batches with the jit-compiled image tokenizer, encodes the text, and writes
`{split}-NNNNN-of-MMMMM.tfrecord` (see `shards.py`) and a stats file, both by
atomic rename (`shard_state.py` owns a shard's files and states), so a
rerun skips finished shards and a killed run loses at most the shards in
flight. After the pipeline the driver writes
`manifest.json`: documents per split, every skipped pair counted by reason
with a sample of their ids, and each split's longest document (`max_tokens`),
so that a training seq_len it does not fit is refused (`check_fits`) instead of
filtered. Nothing is dropped silently. `plan.json` records the source (with the
fingerprint of its contents where it has one: a user's data edited and prepared again),
the shard layout and the settings that decide the records (`plan_settings`: the image
tokenizer and the retrieval encoder by their weights' `fingerprint`); a rerun with others
into the same folder is refused (`check_plan`). A source whose images are smaller than
the image tokenizer's input is refused before any work (each pair would be skipped).

Documents are `caption <break> image` (or `image <break> caption` with
probability `image_first_prob`), one caption per image, chosen by a hash of
the document id so reruns agree.

With `retrieval` bound (a `RetrievalConfig`), each worker also encodes its
written documents with the retrieval encoder; the driver then builds the
memory bank and its index, and a second pipeline writes every document's
neighbors into its shard (`retrieval_pass.py`). Without it the shards hold no
neighbors, and the tasks train with k = 0 retrieved documents.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
import zlib
from typing import Callable, Iterator, Sequence

import gin
import numpy as np
from absl import logging

from cm3leon_jax import fs
from cm3leon_jax.data import retrieval_pass, shards, synthetic, synthetic_tfds, user_data
from cm3leon_jax.data.augment import AugmentConfig
from cm3leon_jax.data.shard_state import ShardFiles
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval.encoder import cached_encoder
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary

SKIP_REASONS = ("bad_image", "image_too_small", "empty_caption",
                "non_utf8_caption", "text_too_long", "document_too_long")
MAX_SAMPLE_IDS = 20


@dataclasses.dataclass
class RawPair:
    doc_id: str
    image: np.ndarray | None  # uint8[h, w, 3]
    captions: Sequence[bytes]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Any prepared TFDS dataset with `id`, `image` and `captions` or `text`.

    `builder_fn` returns the prepared builder (e.g. `synthetic_builder` or
    `user_data_builder`); it runs in the driver once, and again in each worker.
    """

    builder_fn: Callable = gin.REQUIRED

    def num_examples(self, split: str) -> int:
        info = self.builder_fn().info
        if split not in info.splits:
            raise UserInputError(
                f"source has no split {split!r}; it has {sorted(info.splits)}. Name only those "
                "in preprocess.splits, e.g. --gin.preprocess.splits=\"('train', "
                "'validation')\" (gin_configs/runs/preprocess_user.gin binds that).")
        return info.splits[split].num_examples

    def identity(self) -> str | None:
        """The dataset's name, config and version (TFDS's `full_name`), known before it is
        prepared (`_unprepared`)."""
        return self._unprepared().info.full_name if self.builder_fn is not None else None

    def _unprepared(self):
        """The builder as configured: a `builder_fn` that takes `prepare` (user_data_builder)
        is asked with prepare=False, so that nothing is read or built yet."""
        if "prepare" in inspect.signature(self.builder_fn).parameters:
            return self.builder_fn(prepare=False)
        return self.builder_fn()

    def report(self) -> dict | None:
        """What the source itself rejected while it was built (user data's
        report.json: missing, corrupt or truncated image files, ...), if any."""
        path = os.path.join(self.builder_fn().data_path, "report.json")
        if not fs.exists(path):
            return None
        with fs.open(path) as f:
            return json.load(f)

    def fingerprint(self) -> str | None:
        """A hash of the files the prepared dataset was made from (user data's report.json
        `source_fingerprint`), or None for a source without one (the synthetic corpus)."""
        return (self.report() or {}).get("source_fingerprint") or None

    def files_fingerprint(self) -> str | None:
        """`fingerprint` as the source's files are now, before anything is prepared (user
        data: `user_data.source_fingerprint` of its config's source); None for a source
        without files of its own (the synthetic corpus)."""
        config = getattr(self._unprepared(), "builder_config", None)
        files = getattr(config, "source", None)
        return user_data.source_fingerprint(files) if isinstance(files, str) else None

    def image_size(self) -> int | None:
        """The side of the source's square images (its TFDS `image` feature), or None where
        it declares none; known before its images are read (`_unprepared`)."""
        if self.builder_fn is None:
            return None
        features = self._unprepared().info.features
        shape = features["image"].shape if "image" in features else None
        return shape[0] if shape and shape[0] is not None and shape[0] == shape[1] else None

    def read(self, split: str, start: int, stop: int) -> Iterator[RawPair]:
        ds = self.builder_fn().as_dataset(split=f"{split}[{start}:{stop}]",
                                          shuffle_files=False)
        for ex in ds.as_numpy_iterator():
            captions = ex["captions"] if "captions" in ex else [ex["text"]]
            yield RawPair(ex["id"].decode(), ex.get("image"), list(captions))


@gin.configurable
def synthetic_builder(image_size: int = 64, data_dir: str | None = None,
                      split_sizes: dict | None = None, seed: int = 0):
    """The built-in corpus, generated locally on first use."""
    return synthetic_tfds.prepare(synthetic_tfds.SyntheticShapes(
        config=synthetic_tfds.make_config(image_size, split_sizes, seed),
        data_dir=data_dir))


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    num_shards: int
    start: int
    stop: int


def plan_shards(source: TfdsSource, splits: Sequence[str],
                docs_per_shard: int) -> list[ShardSpec]:
    """Each split's examples in shards of about `docs_per_shard` (the source refuses a
    split it does not have)."""
    shards.slices(0, docs_per_shard, "preprocess.docs_per_shard")  # Before any source read.
    specs = []
    for split in splits:
        parts = shards.slices(source.num_examples(split), docs_per_shard,
                              "preprocess.docs_per_shard")
        specs += [ShardSpec(split, i, len(parts), start, stop)
                  for i, (start, stop) in enumerate(parts)]
    return specs


class Tokenizer:
    """Turns checked pairs into document ids; counts what it must skip."""

    def __init__(self, vocab: MultimodalVocabulary, image_tokenizer,
                 max_text_tokens: int, max_doc_tokens: int,
                 image_first_prob: float):
        self.vocab = vocab
        self.images = image_tokenizer
        self.max_text_tokens = max_text_tokens
        self.max_doc_tokens = max_doc_tokens
        self.image_first_prob = image_first_prob
        self.skipped: dict[str, list[str]] = collections.defaultdict(list)

    def _skip(self, reason: str, doc_id: str) -> None:
        self.skipped[reason].append(doc_id)

    def check(self, pair: RawPair) -> tuple[str, np.ndarray] | None:
        """(caption, image) if the pair can become a document, else None."""
        image, size = pair.image, self.images.image_size
        if image is None or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            return self._skip("bad_image", pair.doc_id)
        if min(image.shape[:2]) < size:
            return self._skip("image_too_small", pair.doc_id)
        raw = synthetic.document_caption(pair.doc_id, pair.captions)
        if raw is None:
            return self._skip("empty_caption", pair.doc_id)
        try:
            caption = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return self._skip("non_utf8_caption", pair.doc_id)
        return caption, image

    def documents(self, pairs: list[RawPair], checked: list[tuple[str, np.ndarray]]
                  ) -> Iterator[tuple[shards.TokenizedDocument, str, np.ndarray]]:
        """The pairs' documents (with the caption and image each was made of)."""
        codes = self.images.encode(np.stack([image for _, image in checked]))
        for pair, (caption, _), c in zip(pairs, checked, codes):
            text = document_lib.Text(caption)
            if len(self.vocab.encode(caption)) > self.max_text_tokens:
                self._skip("text_too_long", pair.doc_id)
                continue
            segments = [text, document_lib.Image(c)]
            if zlib.crc32(pair.doc_id.encode() + b"order") / 2**32 < self.image_first_prob:
                segments.reverse()
            ids = document_lib.encode(document_lib.Document(segments), self.vocab)
            if ids.size > self.max_doc_tokens:
                self._skip("document_too_long", pair.doc_id)
                continue
            yield shards.TokenizedDocument(pair.doc_id, ids), caption, pair.image


def tokenize_shard(spec: ShardSpec, source: TfdsSource, tokenizer: Tokenizer,
                   out_dir: str, batch_size: int,
                   vectors: retrieval_pass.VectorWriter | None = None) -> dict:
    """Writes one shard (and its retrieval vectors) then its stats, each atomically;
    the stats file marks the shard done. Returns the stats."""
    tokenizer.skipped.clear()
    longest = None  # of the written documents: which training lengths fit (`check_fits`)

    def batch_docs(pairs, checked):
        nonlocal longest
        made = list(tokenizer.documents(pairs, checked))
        for doc, _, _ in made:
            longest = max(longest or 0, int(doc.ids.size))
        if vectors is not None and made:
            docs, captions, images = zip(*made)
            vectors.add(docs, captions, images)
        return [doc for doc, _, _ in made]

    def docs():
        pairs, checked = [], []
        for pair in source.read(spec.split, spec.start, spec.stop):
            ok = tokenizer.check(pair)
            if ok is not None:
                pairs.append(pair)
                checked.append(ok)
            if len(checked) == batch_size:
                yield from batch_docs(pairs, checked)
                pairs, checked = [], []
        if checked:
            yield from batch_docs(pairs, checked)

    files = ShardFiles.of(out_dir, spec)
    files.forget_neighbors()  # its records are about to be rewritten
    written = files.write_records(docs())
    if vectors is not None:
        vectors.write(files)
    stats = {"split": spec.split, "written": written, "read": spec.stop - spec.start,
             "skipped": {r: ids for r, ids in tokenizer.skipped.items()},
             "max_tokens": longest}
    files.write_stats(stats)
    return stats


PLAN_FILE = shards.PLAN_FILE


SOURCE_FINGERPRINT = "source_fingerprint"


def check_plan(model_dir: str, source: TfdsSource, specs: Sequence[ShardSpec],
               settings: dict | None = None) -> None:
    """Records the source (and its `fingerprint`, where it has one), its shard layout and the
    `plan_settings` in MODEL_DIR/plan.json on the first run, and refuses a rerun where one
    differs (`shards.check_plan`): its shards would sit beside the earlier ones (a split
    read as both), and finished shards would keep records and neighbors made with the
    earlier settings or data. A plan.json from before the settings or the fingerprint were
    recorded is checked for what it holds."""
    identity, fingerprint = source.identity(), source.fingerprint()
    settings = {**({SOURCE_FINGERPRINT: fingerprint} if fingerprint else {}), **(settings or {})}
    recorded = recorded_plan(model_dir)
    earlier = recorded.get(SOURCE_FINGERPRINT)
    if fingerprint and earlier and earlier != fingerprint and recorded.get("source") == identity:
        raise UserInputError(
            f"{model_dir} was preprocessed from {identity} before its files changed "
            f"(source_fingerprint {earlier} then, {fingerprint} now): its finished shards hold "
            "the earlier records, and a rerun would keep them or mix them with the new ones. "
            "Preprocess the changed data into a new MODEL_DIR (or delete this one to start "
            "over).")
    plan = {"source": identity, "shards": shards.plan_layout(specs), **settings}
    planned = [shards.shard_path(model_dir, s.split, s.index, s.num_shards) for s in specs]
    patterns = [shards.shard_pattern(model_dir, split) for split in plan["shards"]]
    shards.check_plan(model_dir, plan, planned, patterns, who="preprocessing",
                      settings="preprocess.docs_per_shard or a setting named here",
                      optional=list(settings))


def check_image_size(source: TfdsSource, image_tokenizer) -> None:
    """Refuses a source whose images are smaller than the image tokenizer's input before
    any work: every pair would be skipped as image_too_small (never upscaled)."""
    size, needed = source.image_size(), image_tokenizer.image_size
    if size is not None and size < needed:
        raise UserInputError(
            f"the source's images are {size} px but the image tokenizer reads {needed} px: "
            "every pair would be skipped as image_too_small (images are never upscaled). "
            f"Prepare the source at {needed} px (user_data_builder.image_size, IMAGE_SIZE in "
            "gin_configs/runs/preprocess_user.gin; smaller images are rejected) or use an "
            f"image tokenizer of {size} px.")


def plan_settings(*, seq_len: int, max_text_tokens: int, image_first_prob: float,
                  text_vocab_size: int, num_sentinels: int,
                  retrieval: retrieval_pass.RetrievalConfig | None, image_tokenizer,
                  recorded: dict | None = None) -> dict:
    """The settings that decide the records, by their gin names, for plan.json: which
    documents are skipped, their layout, the vocabulary made for them, the image tokenizer
    that made their codes (its `fingerprint`: a retrained checkpoint of the same shape gives
    other codes), and their neighbors (`retrieval_pass.plan_entry`). `recorded`: an earlier
    plan.json, whose older form of an entry is kept for the comparison."""
    recorded_retrieval = (recorded or {}).get("preprocess.retrieval")
    return {"preprocess.seq_len": seq_len, "preprocess.max_text_tokens": max_text_tokens,
            "preprocess.image_first_prob": image_first_prob,
            "preprocess.text_vocab_size": text_vocab_size,
            "preprocess.num_sentinels": num_sentinels,
            "preprocess.image_tokenizer_fn": {"config_and_weights": image_tokenizer.fingerprint},
            "preprocess.retrieval": retrieval_pass.plan_entry(retrieval, recorded_retrieval)}


recorded_plan = shards.read_plan  # MODEL_DIR/plan.json as an earlier run wrote it, or {}.


def is_done(spec: ShardSpec, out_dir: str,
            retrieval: retrieval_pass.RetrievalConfig | None = None) -> bool:
    """Whether pass 1 finished the shard (with its vectors, when retrieval is on)."""
    files = ShardFiles.of(out_dir, spec)
    if not files.is_written() or files.read_stats()["read"] != spec.stop - spec.start:
        return False
    if retrieval is None or files.has_vectors(spec.split == retrieval.bank_split):
        return True
    return files.read_stats()["written"] == 0  # a shard that wrote nothing has no vectors


def manifest(specs: Sequence[ShardSpec], out_dir: str) -> dict:
    """Sums every shard's stats into the manifest (counts and sample ids) and, per split, its
    longest written document (`max_tokens`; None with none written), unless a shard's stats
    are from before that was recorded."""
    splits: dict = {}
    for spec in specs:
        stats = ShardFiles.of(out_dir, spec).read_stats()
        s = splits.setdefault(spec.split, {"read": 0, "written": 0, "skipped": {},
                                           "skipped_sample_ids": {}, "max_tokens": None})
        s["read"] += stats["read"]
        s["written"] += stats["written"]
        if "max_tokens" not in stats or "max_tokens" not in s:
            s.pop("max_tokens", None)
        elif stats["max_tokens"] is not None:
            s["max_tokens"] = max(s["max_tokens"] or 0, stats["max_tokens"])
        for reason, ids in stats["skipped"].items():
            s["skipped"][reason] = s["skipped"].get(reason, 0) + len(ids)
            sample = s["skipped_sample_ids"].setdefault(reason, [])
            sample.extend(ids[:MAX_SAMPLE_IDS - len(sample)])
    return {"splits": splits, "shards": len(specs)}


TRAINING_SPLITS = ("train", "validation")
# check_fits counts a folder from before `max_tokens` was recorded only up to this size: it
# reads every record, at every training start and evaluation.
COUNT_AT_MOST = 200_000


def check_fits(config: AugmentConfig, data_dir: str) -> None:
    """Raises UserInputError when a query document of the folder is longer than
    `config.budget` (the training seq_len less the CM3 reserve): the length filter would
    drop it without a word, and when it drops a whole split, seqio repeats the empty
    dataset forever. The longest documents come from the manifest; a folder preprocessed
    before they were recorded is counted from its shards, and there only a split of which
    none fits is refused (the count of the others' dropped documents is logged). Only the
    splits a training run reads count (train, and validation for its held-out loss): the
    test split's documents are left to the runs that read them."""
    path = fs.join(data_dir, "manifest.json")
    recorded = fs.read_json(path) if fs.exists(path) else {}
    counts = recorded.get("splits", {})
    for split in TRAINING_SPLITS:
        if counts.get(split, {}).get("written") == 0:
            _refuse_empty(data_dir, split)
    if counts and all("max_tokens" in c for c in counts.values()):
        over = {split: c["max_tokens"] for split, c in counts.items()
                if split in TRAINING_SPLITS and c["max_tokens"] is not None
                and c["max_tokens"] > config.budget}
        if over:
            split, longest = max(over.items(), key=lambda kv: kv[1])
            raise UserInputError(_too_long(config, data_dir, recorded.get("seq_len"),
                                           f"{split!r} documents of up to {longest} tokens",
                                           longest))
        return
    for split in shards.written_splits(data_dir):
        if split not in TRAINING_SPLITS:
            continue
        if counts.get(split, {}).get("written", 0) > COUNT_AT_MOST:
            logging.warning(
                "%s: its manifest predates recording the longest documents and its %r split "
                "is too large to count at every start (%d documents): documents longer than "
                "train.seq_len=%d allows are left out unchecked; preprocess it again into a "
                "new folder to have them refused.", data_dir, split, counts[split]["written"],
                config.seq_len)
            continue
        lengths = shards.query_lengths(data_dir, split)
        if not lengths.size:
            _refuse_empty(data_dir, split)
        dropped = int((lengths > config.budget).sum())
        if dropped and dropped == lengths.size:
            raise UserInputError(_too_long(
                config, data_dir, recorded.get("seq_len"), f"{split!r} documents of up to "
                f"{lengths.max()} tokens (all {dropped} of them)", int(lengths.max())))
        if dropped:
            logging.warning(
                "%s: %d of %d %r documents are longer than train.seq_len=%d allows (%d tokens "
                "beside the CM3 reserve); training leaves them out. Its manifest predates "
                "recording the longest documents: preprocess it again into a new folder to "
                "have them refused instead.", data_dir, dropped, lengths.size, split,
                config.seq_len, config.budget)


def _refuse_empty(data_dir: str, split: str) -> None:
    """An empty split a training run reads: seqio would repeat it forever (a hang)."""
    raise UserInputError(
        f"{data_dir!r} holds no {split!r} documents: a training run reads that split "
        f"({'its batches' if split == 'train' else 'its held-out loss'}) and would wait on "
        "it forever. Preprocess data with documents in both train and validation (see the "
        "manifest's skipped counts for why none were written).")


def _too_long(config: AugmentConfig, data_dir: str, seq_len: int | None, what: str,
              longest: int) -> str:
    """check_fits's message: the settings that make `longest` not fit, and what fits it."""
    reserve = config.seq_len - config.budget
    spans = (config.seq_len - longest) // 3
    fewer_spans = (f", or bind retrieval_augment.max_spans <= {spans} (its CM3 reserve, "
                   f"3 * max_spans = {reserve} tokens, is what leaves too little room)"
                   if spans >= 1 else "")
    made = f" The folder was preprocessed with preprocess.seq_len={seq_len}." if seq_len else ""
    return (f"{data_dir!r} has {what} longer than train.seq_len={config.seq_len} allows "
            f"({config.budget} fit beside the CM3 reserve of 3 * retrieval_augment.max_spans "
            f"= {reserve}): training would drop them without a word.{made} Train with "
            f"train.seq_len >= {longest + reserve}{fewer_spans}, or preprocess "
            f"into a new folder with preprocess.seq_len={config.seq_len} (which skips the "
            "longer documents, counted in its manifest).")


def train_vocabulary(source: TfdsSource, image_tokenizer, directory: str, *,
                     text_vocab_size: int, num_sentinels: int,
                     max_captions: int = 100_000) -> MultimodalVocabulary:
    """Trains the text model on the train split's captions and lays out the ids."""
    from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

    def captions():
        n = min(source.num_examples("train"), max_captions)
        for pair in source.read("train", 0, n):
            for c in pair.captions:
                try:
                    yield c.decode("utf-8") if isinstance(c, bytes) else c
                except UnicodeDecodeError:
                    continue  # Counted when the pair itself is tokenized.

    try:
        text = TextTokenizer.train(captions(), vocab_size=text_vocab_size)
    except UserInputError:  # Reading the source (user data changed, unreadable): as it is.
        raise
    except ValueError as e:  # Too few captions for the size, or a size below byte fallback.
        raise UserInputError(f"{e} (the text vocabulary's size is preprocess.text_vocab_size: "
                             "bind --gin.preprocess.text_vocab_size=N)") from None
    return MultimodalVocabulary.create(
        directory, text, image_codes=image_tokenizer.codebook_size,
        num_sentinels=num_sentinels, image_length=image_tokenizer.codes_per_image)


def _vocabulary(source: TfdsSource, image_tokenizer, model_dir: str, text_vocab_size: int,
                num_sentinels: int) -> MultimodalVocabulary:
    """MODEL_DIR/vocab: trained on the first run, checked against the settings after."""
    vocab_dir = os.path.join(model_dir, "vocab")
    if not fs.exists(os.path.join(vocab_dir, "layout.json")):
        train_vocabulary(source, image_tokenizer, vocab_dir,
                         text_vocab_size=text_vocab_size, num_sentinels=num_sentinels)
    vocab = MultimodalVocabulary(vocab_dir)
    if vocab.layout.image_length != image_tokenizer.codes_per_image:
        raise UserInputError(
            f"{vocab_dir} was made for {vocab.layout.image_length} codes per image but "
            f"the image tokenizer gives {image_tokenizer.codes_per_image}; use a new "
            "output folder for a different image tokenizer.")
    made = {"text_vocab_size": vocab.layout.text_size, "num_sentinels": vocab.layout.num_sentinels}
    asked = {"text_vocab_size": text_vocab_size, "num_sentinels": num_sentinels}
    if made != asked and not recorded_plan(model_dir):
        # A vocabulary an earlier run trained and died before recording its plan (a plan,
        # when there is one, names the settings that changed: `check_plan`).
        raise UserInputError(
            f"{vocab_dir} was trained with {made}, and this run asks for {asked}: preprocess "
            "into a new output folder, or bind the vocabulary's settings.")
    return vocab


_IMAGE_TOKENIZERS: dict = {}


def _image_tokenizer(fn: Callable):
    """One tokenizer per process and configuration: in-process workers reuse the driver's.
    Keyed by the gin config too: `load_image_tokenizer` is one function whatever checkpoint
    gin binds it to, and a later run in the same process (another preprocessing, an SFT
    preprocessing of an imported model) must not get the first one's tokenizer. Only the
    latest is kept: a process that preprocesses again and again holds one tokenizer."""
    key = (fn, gin.config_str())
    if key not in _IMAGE_TOKENIZERS:
        _IMAGE_TOKENIZERS.clear()
        _IMAGE_TOKENIZERS[key] = fn()
    return _IMAGE_TOKENIZERS[key]


@dataclasses.dataclass
class ShardWorker:
    """What each Beam worker runs per shard; holds only picklable settings.

    The vocabulary and the jit-compiled image tokenizer are built in `setup`,
    once per worker. Workers in other processes (Dataflow, Flink) get the
    driver's gin config, so `source` and `image_tokenizer_fn` resolve the same.
    """

    source: TfdsSource
    image_tokenizer_fn: Callable
    out_dir: str
    batch_size: int
    max_text_tokens: int
    max_doc_tokens: int
    image_first_prob: float
    retrieval: retrieval_pass.RetrievalConfig | None = None
    gin_config: str = ""

    def setup(self) -> None:
        if self.gin_config and not gin.config_str():
            gin.parse_config(self.gin_config)
        vocab = MultimodalVocabulary(os.path.join(self.out_dir, "vocab"))
        self._tokenizer = Tokenizer(vocab, _image_tokenizer(self.image_tokenizer_fn),
                                    self.max_text_tokens, self.max_doc_tokens,
                                    self.image_first_prob)
        self._encoder = None
        if self.retrieval is not None:
            from cm3leon_jax.retrieval.encoder import cached_encoder
            self._encoder = cached_encoder(self.retrieval.encoder_dir)

    def __call__(self, spec: ShardSpec) -> dict:
        vectors = (retrieval_pass.VectorWriter(self._encoder, self.retrieval, spec)
                   if self.retrieval is not None else None)
        stats = tokenize_shard(spec, self.source, self._tokenizer, self.out_dir,
                               self.batch_size, vectors)
        counters = {"documents": stats["written"]}
        counters.update({reason: len(ids) for reason, ids in stats["skipped"].items()})
        return {**stats, "counters": counters}


def run_pipeline(specs: Sequence[ShardSpec], worker, runner: str,
                 pipeline_options: Sequence[str], stage: str = "Tokenize") -> None:
    """Runs `worker(spec)` for every spec as a Beam pipeline.

    `worker` is picklable, has `setup()` (run once per Beam worker) and returns
    stats whose `counters` become Beam metrics.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    class RunShard(beam.DoFn):
        def __init__(self, worker):
            self.worker = worker

        def setup(self):
            self.worker.setup()

        def process(self, spec):
            stats = self.worker(spec)
            for name, value in stats.get("counters", {}).items():
                beam.metrics.Metrics.counter("preprocess", name).inc(value)
            yield spec

    options = PipelineOptions(list(pipeline_options), runner=runner)
    with beam.Pipeline(options=options) as p:
        _ = (p | "Shards" >> beam.Create(list(specs))
             | "Spread" >> beam.Reshuffle()
             | stage >> beam.ParDo(RunShard(worker)))


@gin.configurable(denylist=["model_dir"])
def preprocess(model_dir: str,
               source: TfdsSource = gin.REQUIRED,
               image_tokenizer_fn: Callable = gin.REQUIRED,
               splits: Sequence[str] = ("train", "validation", "test"),
               docs_per_shard: int = 1000,
               batch_size: int = 32,
               text_vocab_size: int = 1024,
               num_sentinels: int = 512,
               max_text_tokens: int = 256,
               seq_len: int = 4096,
               image_first_prob: float = 0.0,
               retrieval: retrieval_pass.RetrievalConfig | None = None,
               runner: str = "DirectRunner",
               pipeline_options: Sequence[str] = ()) -> dict:
    """Tokenizes `source` into `model_dir` (shards, vocab/, manifest.json).

    Args:
      model_dir: the tokenized data folder (what tasks' `data_dirs` point at).
      source: where the pairs come from.
      image_tokenizer_fn: returns the `ImageTokenizer` (e.g.
        `@load_image_tokenizer`, with its checkpoint bound in gin).
      splits: source splits to tokenize.
      docs_per_shard: pairs per output shard (the unit of work and of resume).
      batch_size: images per VQ encoder call.
      text_vocab_size: pieces of the text model trained here when `vocab/`
        does not exist yet (an existing vocabulary is reused).
      num_sentinels: CM3 sentinels in the layout.
      max_text_tokens: longer captions are skipped as `text_too_long`.
      seq_len: the training length; documents that cannot fit are skipped.
      image_first_prob: share of documents laid out `image <break> caption`.
      retrieval: when given, every document's neighbors are retrieved and
        written into the shards, and `model_dir/retrieval` holds the bank and
        index they came from (see retrieval_pass.py). None: no neighbors.
      runner, pipeline_options: Beam's, e.g. "DataflowRunner" and
        ["--project=...", "--region=...", "--temp_location=gs://..."].
    """
    image_tokenizer = _image_tokenizer(image_tokenizer_fn)
    check_image_size(source, image_tokenizer)
    specs = plan_shards(source, splits, docs_per_shard)  # A split it lacks: before any work.
    if retrieval is not None:  # A wrong encoder folder before the text model is trained.
        cached_encoder(retrieval.encoder_dir)
    _vocabulary(source, image_tokenizer, model_dir, text_vocab_size, num_sentinels)
    budget = AugmentConfig(seq_len=seq_len).budget
    check_plan(model_dir, source, specs, plan_settings(
        seq_len=seq_len, max_text_tokens=max_text_tokens, image_first_prob=image_first_prob,
        text_vocab_size=text_vocab_size, num_sentinels=num_sentinels, retrieval=retrieval,
        image_tokenizer=image_tokenizer, recorded=recorded_plan(model_dir)))
    if retrieval is None:  # A folder from before plan.json recorded the setting.
        retrieval_pass.check_none_before(model_dir)
    todo = [s for s in specs if not is_done(s, model_dir, retrieval)]
    logging.info("preprocess: %d shards, %d already done", len(specs), len(specs) - len(todo))

    if todo:
        worker = ShardWorker(source, image_tokenizer_fn, model_dir, batch_size,
                             max_text_tokens, budget, image_first_prob, retrieval,
                             gin_config=gin.config_str())
        run_pipeline(todo, worker, runner, pipeline_options)
    result = manifest(specs, model_dir)
    result["seq_len"] = seq_len
    result["source_report"] = source.report()
    shards.write_manifest(model_dir, result)  # Its skip counts explain a retrieval failure.
    if retrieval is not None:
        result["retrieval"] = _retrieve(specs, todo, model_dir, retrieval, runner,
                                        pipeline_options)
        shards.write_manifest(model_dir, result)
    for split, s in result["splits"].items():
        logging.info("preprocess %s: %d read, %d written, skipped %s",
                     split, s["read"], s["written"], s["skipped"] or "none")
    return result


def _retrieve(specs: Sequence[ShardSpec], tokenized: Sequence[ShardSpec], model_dir: str,
              retrieval: retrieval_pass.RetrievalConfig, runner: str,
              pipeline_options: Sequence[str]) -> dict:
    """Builds the bank and index, then writes every shard's neighbors (pass 2)."""
    bank_changed = any(s.split == retrieval.bank_split for s in tokenized)
    bank = retrieval_pass.build_bank(model_dir, retrieval, bank_changed)
    todo = [s for s in specs if not ShardFiles.of(model_dir, s).has_neighbors()]
    logging.info("neighbors: %d shards, %d already done", len(specs), len(specs) - len(todo))
    if todo:
        worker = retrieval_pass.NeighborWorker(model_dir, retrieval, gin.config_str())
        run_pipeline(todo, worker, runner, pipeline_options, stage="Neighbors")
    summary = retrieval_pass.summarize(specs, model_dir, bank)
    for split, s in summary["splits"].items():
        logging.info("neighbors %s: %.2f per document (%s for 0..k)", split,
                     s["mean_neighbors"], s["neighbors_per_document"])
    return summary


def _preflight(model_dir: str) -> None:
    """`main.run` calls this before it writes MODEL_DIR/config.gin: refuses a MODEL_DIR that
    is the user's data folder or lies inside it (`user_data.check_outside`)."""
    user_data.check_outside(model_dir, "preprocess")


preprocess.preflight = _preflight
