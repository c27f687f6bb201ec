"""The unified vocabulary: id layout, text tokenizer, seqio interface, documents."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.vocab import document as doc_lib
from cm3leon_jax.vocab.document import Document, Image, Text
from cm3leon_jax.vocab.layout import BREAK_ID, EOS_ID, EOSS_ID, PAD_ID, IdLayout
from cm3leon_jax.vocab.multimodal import MultimodalVocabulary
from cm3leon_jax.vocab.text_tokenizer import TextTokenizer

CAPTIONS = [
    f"a {size} {color} {shape} {rel} a {color2} {shape2}"
    for size in ("small", "large") for color in ("red", "blue", "green")
    for shape in ("circle", "star") for rel in ("above", "left of")
    for color2 in ("yellow", "purple") for shape2 in ("square", "triangle")]

IMAGE_LENGTH = 16


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vocab"))
    return MultimodalVocabulary.create(
        directory, TextTokenizer.train(CAPTIONS, vocab_size=290), image_codes=64,
        num_sentinels=8, image_length=IMAGE_LENGTH)


# --- layout -----------------------------------------------------------------

@given(text=st.integers(1, 70_000), image=st.integers(1, 20_000),
       sentinels=st.integers(0, 600))
def test_layout_ranges_partition_the_ids(text, image, sentinels):
    l = IdLayout(text_size=text, image_codes=image, num_sentinels=sentinels)
    assert l.vocab_size % 128 == 0 and l.vocab_size >= l.used_size
    assert l.vocab_size - l.used_size < 128
    ids = np.arange(l.used_size)
    kinds = (l.is_special(ids).astype(int) + l.is_text(ids) + l.is_image(ids))
    assert (kinds == 1).all()  # every used id is exactly one kind
    assert l.is_sentinel(ids).sum() == sentinels
    assert l.is_text(ids).sum() == text and l.is_image(ids).sum() == image
    codes = np.arange(image)
    np.testing.assert_array_equal(l.ids_to_codes(l.codes_to_ids(codes)), codes)


def test_paper_layout_size():
    # 5 fixed specials + 512 sentinels + 56,320 text + 8,192 image = 65,029 -> 65,152.
    l = IdLayout()
    assert l.used_size == 65_029 and l.vocab_size == 65_152


def test_special_names_round_trip():
    l = IdLayout(num_sentinels=4)
    for i in range(l.text_start):
        assert l.special_id(l.special_name(i)) == i
    with pytest.raises(ValueError, match="sentinel index 4"):
        l.sentinel_id(4)
    with pytest.raises(ValueError, match="unknown special token"):
        l.special_id("<mask>")


def test_layout_rejects_codes_outside_codebook():
    with pytest.raises(ValueError, match="codebook"):
        IdLayout(image_codes=8).codes_to_ids([0, 8])


# --- text tokenizer ---------------------------------------------------------

def test_text_tokenizer_training_is_deterministic():
    a = TextTokenizer.train(CAPTIONS, vocab_size=280)
    b = TextTokenizer.train(iter(CAPTIONS), vocab_size=280)
    assert a.model_proto == b.model_proto


def test_text_tokenizer_too_large_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="too small for vocab_size=5000"):
        TextTokenizer.train(CAPTIONS[:10], vocab_size=5000)


@pytest.mark.parametrize("size", [100, 257, 260])
def test_text_tokenizer_too_small_a_vocabulary_names_the_size_the_corpus_needs(size):
    """The bytes, <unk> and one piece per distinct character: exactly what it needs (a
    fixed floor of 260 was named before, which no captions fit)."""
    needed = 257 + len(set("".join(CAPTIONS)))
    with pytest.raises(ValueError, match=f"vocab_size={size} cannot hold the 256 byte pieces, "
                       f"<unk> and one piece per distinct character of the corpus: use at "
                       f"least {needed}\\.$"):
        TextTokenizer.train(CAPTIONS, vocab_size=size)
    TextTokenizer.train(CAPTIONS, vocab_size=needed)
    with pytest.raises(ValueError, match="vocab_size=0: give a whole number"):
        TextTokenizer.train(CAPTIONS, vocab_size=0)


@settings(deadline=None, max_examples=60)
@given(st.text(max_size=40))
def test_text_round_trips_exactly(vocab, text):
    # Byte fallback + identity normalization: any unicode string comes back.
    assert vocab.decode(vocab.encode(text)) == text


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from(["\u2581", " ", "a", "red", "\u00e9", "\U0001f600"]),
                max_size=12).map("".join))
def test_text_with_sentencepiece_whitespace_symbol_round_trips(vocab, text):
    # U+2581 is SentencePiece's whitespace symbol; as a character of the text it must come
    # back as itself, not as a space.
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.text_tokenizer.decode(vocab.text_tokenizer.encode(text)) == text


def test_text_without_the_whitespace_symbol_keeps_sentencepiece_ids(vocab):
    tokenizer = vocab.text_tokenizer
    for caption in CAPTIONS[:8] + [" a  red\tcircle ", "caf\u00e9 \U0001f600"]:
        assert tokenizer.encode(caption).tolist() == tokenizer._sp.encode(caption)
    assert tokenizer.decode(tokenizer.encode("bar\u2581chart")) == "bar\u2581chart"


# --- seqio vocabulary -------------------------------------------------------

def test_vocabulary_directory_reopens_equal(vocab):
    again = MultimodalVocabulary(lambda: vocab.directory)
    assert again == vocab and hash(again) == hash(vocab)
    assert again.layout.image_length == IMAGE_LENGTH


def test_fingerprint_follows_the_text_model_and_layout_not_the_folder(vocab, tmp_path):
    """Copies share it; a text model trained on other text, of the same size, or another
    layout does not (the size checks cannot tell those apart)."""
    import shutil
    shutil.copytree(vocab.directory, tmp_path / "copy")
    assert MultimodalVocabulary(str(tmp_path / "copy")).fingerprint == vocab.fingerprint
    other_text = [c.replace("above", "below") for c in CAPTIONS]
    retrained = MultimodalVocabulary.create(
        str(tmp_path / "retrained"), TextTokenizer.train(other_text, vocab_size=290),
        image_codes=64, num_sentinels=8, image_length=IMAGE_LENGTH)
    assert retrained.layout == vocab.layout and retrained.fingerprint != vocab.fingerprint
    relaid = MultimodalVocabulary.create(
        str(tmp_path / "relaid"), vocab.text_tokenizer, image_codes=64, num_sentinels=9,
        image_length=IMAGE_LENGTH)
    assert relaid.fingerprint != vocab.fingerprint


def test_a_path_function_follows_its_folder(vocab, tmp_path):
    """A task's vocabulary (registered at import, its folder from gin) reads the folder bound
    now, not the first one it read: two runs in one process may bind two data folders."""
    other = MultimodalVocabulary.create(
        str(tmp_path / "other"), TextTokenizer.train(CAPTIONS, vocab_size=285), image_codes=32,
        num_sentinels=4, image_length=8)
    folder = [vocab.directory]
    lazy = MultimodalVocabulary(lambda: folder[0])
    assert lazy.layout == vocab.layout and lazy.encode("a red circle") == vocab.encode(
        "a red circle")
    folder[0] = other.directory
    assert lazy.layout == other.layout and lazy.layout != vocab.layout
    assert lazy.text_tokenizer.vocab_size == 285 and lazy == other


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vocabulary directory"):
        MultimodalVocabulary(str(tmp_path)).layout


def test_seqio_interface(vocab):
    l = vocab.layout
    assert vocab.vocab_size == l.vocab_size and vocab.vocab_size % 128 == 0
    assert (vocab.pad_id, vocab.eos_id) == (PAD_ID, EOS_ID)
    ids = vocab.encode("a red circle")
    assert all(l.is_text(i) for i in ids)
    # seqio semantics: decode stops at the first <eos>; non-text ids are skipped.
    image = l.codes_to_ids([1, 2]).tolist()
    assert vocab.decode(ids + [BREAK_ID] + image + [EOS_ID] + ids) == "a red circle"


def test_tf_encode_decode_match_python(vocab):
    text = "a small blue star above a purple square"
    tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
    assert tf_ids == vocab.encode(text)
    assert vocab.decode_tf(tf.constant(tf_ids)).numpy().decode() == text
    batch = tf.constant([tf_ids + [BREAK_ID], tf_ids + [EOS_ID]])
    assert [s.decode() for s in vocab.decode_tf(batch).numpy()] == [text, text]


WITH_META = ["\u2581", "\u2581a red", "a red\u2581", "a\u2581red circle", "a \u2581\u2581\u2581 b",
             "\u2581\u2581", "caf\u00e9\u2581\U0001f600 ", "", "a small blue star",
             " a  red\tcircle "]


def test_tf_encode_keeps_the_whitespace_symbol_as_python_does(vocab):
    """U+2581 in the text: TF (seqio's data pipelines) gives `encode`'s ids, its byte pieces
    rather than SentencePiece's space, for a string, a batch and inside a tf.data map."""
    expected = [vocab.encode(t) for t in WITH_META]
    for text, ids in zip(WITH_META, expected):
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids, text
        assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == text
    assert vocab.encode_tf(tf.constant(WITH_META)).to_list() == expected
    mapped = tf.data.Dataset.from_tensor_slices(WITH_META).map(vocab.encode_tf)
    assert [ids.tolist() for ids in mapped.as_numpy_iterator()] == expected
    # Text without it: SentencePiece's own ids, as before.
    sp = vocab._tf_tokenizer.tokenize(tf.constant(CAPTIONS[:8])) + vocab.layout.text_start
    assert vocab.encode_tf(tf.constant(CAPTIONS[:8])).to_list() == sp.to_list()


def test_tf_encode_without_byte_fallback_is_sentencepiece(vocab):
    plain = MultimodalVocabulary(vocab.directory)
    plain.text_tokenizer._meta_ids = None  # As for a model trained without byte fallback.
    text = "a\u2581red circle"
    sp = plain.text_tokenizer._sp.encode(text)
    assert plain.encode(text) == plain.layout.text_to_ids(np.asarray(sp)).tolist()
    assert plain.encode_tf(tf.constant(text)).numpy().tolist() == plain.encode(text)


def test_render_shows_every_token(vocab):
    l = vocab.layout
    ids = np.concatenate([vocab.encode("a red circle"), [BREAK_ID],
                          l.codes_to_ids(np.zeros(3, int)), [l.sentinel_id(2), EOSS_ID]])
    assert vocab.render(ids) == "a red circle<break><img:3><sentinel:2><eoss>"


# --- documents --------------------------------------------------------------

def _documents(image_codes):
    text = st.builds(Text, st.text(min_size=1, max_size=20))
    image = st.builds(
        Image, st.lists(st.integers(0, image_codes - 1), min_size=IMAGE_LENGTH,
                        max_size=IMAGE_LENGTH).map(np.array))
    return st.lists(st.one_of(text, image), min_size=1, max_size=5).map(Document)


@settings(deadline=None, max_examples=80)
@given(doc=_documents(64))
def test_document_round_trip(vocab, doc):
    ids = doc_lib.encode(doc, vocab)
    assert ids.dtype == np.int32
    assert (ids == BREAK_ID).sum() == len(doc.segments) - 1
    assert doc_lib.decode(ids, vocab) == doc


@settings(deadline=None, max_examples=30)
@given(docs=st.lists(_documents(64), min_size=1, max_size=4))
def test_join_and_split_documents(vocab, docs):
    encoded = [doc_lib.encode(d, vocab) for d in docs]
    joined = doc_lib.join_documents(encoded)
    padded = np.concatenate([joined, np.zeros(5, np.int32)])
    back = [doc_lib.decode(p, vocab) for p in doc_lib.split_documents(padded)]
    assert back == docs


def test_caption_image_layout(vocab):
    codes = np.arange(IMAGE_LENGTH) % 64
    doc = Document([Text("a red circle"), Image(codes)])
    ids = doc_lib.encode(doc, vocab)
    n_text = len(vocab.encode("a red circle"))
    assert ids[n_text] == BREAK_ID
    np.testing.assert_array_equal(ids[n_text + 1:], vocab.layout.codes_to_ids(codes))
    assert doc.is_multimodal and doc.texts == ["a red circle"]


def test_decode_errors_name_the_problem(vocab):
    l = vocab.layout
    text = vocab.encode("a red circle")
    image = l.codes_to_ids(np.zeros(IMAGE_LENGTH, int))
    with pytest.raises(ValueError, match=f"id {l.used_size} at position"):
        doc_lib.decode([*text, l.used_size], vocab)
    with pytest.raises(ValueError, match=r"truncated image span at position \d+: 15 codes"):
        doc_lib.decode([*text, BREAK_ID, *image[:-1]], vocab)
    with pytest.raises(ValueError, match="mixes text and image ids"):
        doc_lib.decode([*text, *image], vocab)
    with pytest.raises(ValueError, match="<eos> at position"):
        doc_lib.decode([*text, EOS_ID, *text], vocab)
    with pytest.raises(ValueError, match="empty segment at position 0"):
        doc_lib.decode([BREAK_ID, *text], vocab)


def test_encode_errors_name_the_problem(vocab):
    with pytest.raises(ValueError, match="image segment 1 has 3 codes"):
        doc_lib.encode(Document([Text("a"), Image(np.zeros(3, int))]), vocab)
    with pytest.raises(ValueError, match="codebook"):
        doc_lib.encode(Document([Image(np.full(IMAGE_LENGTH, 64))]), vocab)
    with pytest.raises(ValueError, match="non-empty str"):
        Text("")
    with pytest.raises(ValueError, match="1-D integer array"):
        Image(np.zeros((4, 4), int))
