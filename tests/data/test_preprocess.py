"""The preprocess run mode: Beam pipeline, resume, manifest, skipped inputs."""

import functools
import json
import os

import numpy as np
import pytest

from cm3leon_jax.data import preprocess as pp
from cm3leon_jax.data import shards
from cm3leon_jax.errors import UserInputError
from cm3leon_jax.vocab import document as document_lib
from cm3leon_jax.vocab.image_tokenizer import ImageTokenizer
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.vqgan import VQGANConfig

TINY_VQ = VQGANConfig(image_size=32, base_channels=8, channel_multipliers=(1, 2, 2),
                      num_res_blocks=1, attn_levels=(), latent_channels=8, embed_dim=8,
                      codebook_size=64, num_groups=4)


@functools.cache
def tiny_image_tokenizer():
    return ImageTokenizer.random_init(TINY_VQ, seed=0, batch_size=4)


class ListSource(pp.TfdsSource):
    """An in-memory source with the TfdsSource interface, for bad inputs."""

    def __init__(self, pairs):
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "builder_fn", None)

    def num_examples(self, split):
        return len(self.pairs)

    def read(self, split, start, stop):
        yield from self.pairs[start:stop]

    def report(self):
        return None


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return pp.TfdsSource(functools.partial(
        pp.synthetic_builder, image_size=32, data_dir=data_dir,
        split_sizes={"train": 24, "validation": 6, "test": 6}))


def _run(source, out, text_vocab_size=300, **kw):
    return pp.preprocess(str(out), source=source, image_tokenizer_fn=tiny_image_tokenizer,
                         docs_per_shard=10, batch_size=4, text_vocab_size=text_vocab_size,
                         num_sentinels=8, seq_len=512, **kw)


def test_synthetic_corpus_round_trips_through_shards(synthetic_source, tmp_path):
    result = _run(synthetic_source, tmp_path)
    train = dict(result["splits"]["train"])
    assert 64 < train.pop("max_tokens") <= 512 - 24  # an image and its caption, fitting
    assert train == {"read": 24, "written": 24, "skipped": {}, "skipped_sample_ids": {}}
    assert result["shards"] == 3 + 1 + 1
    assert result["source_report"] is None  # the synthetic corpus rejects nothing
    assert json.load(open(tmp_path / "manifest.json")) == result
    vocab = MultimodalVocabulary(str(tmp_path / "vocab"))
    assert vocab.layout.image_length == 64 and vocab.layout.image_codes == 64
    records = list(shards.read_split(str(tmp_path), "train").as_numpy_iterator())
    assert len(records) == 24
    pairs = {p.doc_id: p for p in synthetic_source.read("train", 0, 24)}
    codes = tiny_image_tokenizer().encode(np.stack([pairs[r["doc_id"].decode()].image
                                                    for r in records[:4]]))
    for r, c in zip(records[:4], codes):
        doc = document_lib.decode(r["ids"], vocab)
        caption, image = doc.segments
        assert caption.text.encode() in pairs[r["doc_id"].decode()].captions
        np.testing.assert_array_equal(image.codes, c)


def test_rerun_skips_finished_shards(synthetic_source, tmp_path):
    _run(synthetic_source, tmp_path)
    first = shards.shard_path(str(tmp_path), "train", 0, 3)
    before = os.path.getmtime(first)
    os.remove(shards.shard_path(str(tmp_path), "train", 1, 3) + ".stats.json")
    result = _run(synthetic_source, tmp_path)
    assert os.path.getmtime(first) == before  # untouched
    assert result["splits"]["train"]["written"] == 24


def test_bad_inputs_are_counted_never_lost(tmp_path):
    good = np.zeros((32, 32, 3), np.uint8)
    pairs = [
        pp.RawPair("ok-1", good, [b"a red circle"]),
        pp.RawPair("ok-2", good, [b"", b"a blue star"]),
        pp.RawPair("no-image", None, [b"a red circle"]),
        pp.RawPair("gray", np.zeros((32, 32), np.uint8), [b"a red circle"]),
        pp.RawPair("small", np.zeros((16, 16, 3), np.uint8), [b"a red circle"]),
        pp.RawPair("empty", good, [b"  "]),
        pp.RawPair("latin1", good, ["caf\u00e9".encode("latin-1")]),
        pp.RawPair("long", good, [b"a red circle " * 40]),
    ]
    result = _run(ListSource(pairs), tmp_path, splits=("train",), max_text_tokens=100,
                  text_vocab_size=270)
    train = result["splits"]["train"]
    assert train["read"] == 8 and train["written"] == 2
    assert train["skipped"] == {"bad_image": 2, "image_too_small": 1, "empty_caption": 1,
                                "non_utf8_caption": 1, "text_too_long": 1}
    assert train["skipped_sample_ids"]["bad_image"] == ["no-image", "gray"]
    assert sum(train["skipped"].values()) + train["written"] == train["read"]


def test_user_data_rejects_reach_the_manifest(tmp_path):
    """Files the user-data builder could not read are in the manifest too."""
    from PIL import Image as PILImage

    from cm3leon_jax.data import user_data
    src = tmp_path / "pairs"
    src.mkdir()
    PILImage.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(src / "good.png")
    PILImage.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(src / "good2.png")
    (src / "bad.png").write_bytes(b"not a png")
    lines = [{"image": "good.png", "text": "a grey square"},
             {"image": "good2.png", "text": "a dark square"},
             {"image": "bad.png", "text": "a broken file"},
             {"image": "gone.png", "text": "a missing file"}]
    (src / "pairs.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    source = pp.TfdsSource(functools.partial(
        user_data.user_data_builder, str(src / "pairs.jsonl"), image_size=32,
        data_dir=str(tmp_path / "tfds")))
    result = _run(source, tmp_path / "out", splits=("train", "validation"), text_vocab_size=266)
    assert result["splits"]["train"]["written"] == result["splits"]["validation"]["written"] == 1
    report = result["source_report"]
    assert report["rejected"]["corrupt_image"] == 1 and report["rejected"]["missing_image"] == 1
    assert report["total"] == 4 and report["ok"] == 2


def test_a_vocabulary_too_large_for_the_captions_names_the_binding(synthetic_source, tmp_path):
    with pytest.raises(UserInputError, match=r"too small for vocab_size=2000.*"
                                             r"--gin\.preprocess\.text_vocab_size=N"):
        _run(synthetic_source, tmp_path / "out", text_vocab_size=2000)


def test_a_rerun_from_another_source_or_layout_is_refused(synthetic_source, tmp_path):
    """Shards of two layouts in one folder would be read as one split: refused, named."""
    _run(synthetic_source, tmp_path)
    plan = json.loads((tmp_path / pp.PLAN_FILE).read_text())
    assert plan["shards"] == {"train": [3, 24], "validation": [1, 6], "test": [1, 6]}
    assert plan["source"].startswith("synthetic_shapes/")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserInputError, match=r"shards: .*\[3, 24\].* then, .*\[2, 24\].* now"):
        pp.preprocess(str(tmp_path), source=synthetic_source,
                      image_tokenizer_fn=tiny_image_tokenizer, docs_per_shard=12, batch_size=4,
                      text_vocab_size=300, num_sentinels=8, seq_len=512)
    grown = ListSource([pp.RawPair(f"p{i}", None, [b"a red circle"]) for i in range(3)])
    with pytest.raises(UserInputError, match="another source or shard layout"):
        _run(grown, tmp_path)
    assert sorted(os.listdir(tmp_path)) == before
    os.remove(tmp_path / pp.PLAN_FILE)  # A folder from before plan.json: its shards are checked.
    with pytest.raises(UserInputError, match=r"shards of another layout \(train-00000-of-00003"):
        _run(grown, tmp_path)


def test_a_shard_record_is_the_same_bytes_in_every_process():
    """The Example's feature map is written in a fixed order: without it protobuf's map order
    changed from process to process, and two preprocessing runs of one seed wrote shards of
    equal records but other bytes."""
    import subprocess
    import sys
    script = ("from cm3leon_jax.data import shards\n"
              "doc = shards.TokenizedDocument('d0', [5, 6, 7], [[1, 2], [3]], ['a', 'b'])\n"
              "print(shards.serialize(doc).hex())\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, cwd=root,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in range(3)}
    assert len(outs) == 1
