"""The HTTP service: answers match exact search; bad requests get 4xx, never a crash; a short
loopback load test where every request sent is answered or rejected, by the server's count."""

import asyncio
import dataclasses
import io
import itertools

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from retrieval_testlib import SELECTION, clear_of_ties, exact_search

from cm3leon_jax.data.synthetic import synthetic_documents
from cm3leon_jax.retrieval import load_generator
from cm3leon_jax.retrieval.client import RetrievalClient, encode_png
from cm3leon_jax.retrieval.load_generator import ServerProcess
from cm3leon_jax.retrieval.retriever import Retriever
from cm3leon_jax.retrieval.server import ServiceLimits, create_app

SERVE_BINDINGS = [f"SelectionConfig.{f}={getattr(SELECTION, f)}"
                  for f in ("max_relevance", "max_redundancy", "overfetch")]


@pytest.fixture(scope="module")
def retriever(retrieval_dir):
    return Retriever.open(retrieval_dir, SELECTION)


@pytest.fixture(scope="module")
def http(retriever):
    limits = ServiceLimits(max_body_bytes=200_000, max_batch=8, max_k=5, max_image_pixels=128 * 128)
    return TestClient(create_app(retriever, limits))


@pytest.fixture(scope="module")
def doc():
    return next(synthetic_documents(split="test", num=1))


def test_answers_match_exact_search(http, retriever, doc):
    bank, encoder = retriever.bank, retriever.encoder
    assert http.get("/health").json()["num_docs"] == len(bank)
    vecs = bank.vectors(np.array([3, 50]))
    got = http.post("/search/vector", json={"vectors": vecs.tolist(), "k": 3}).json()["results"]
    assert [g["doc_ids"] for g in got] == exact_search(bank, vecs, 3)
    rows = [[bank.row_of(d) for d in g["doc_ids"]] for g in got]
    assert [g["token_ids"] for g in got] == [[bank.tokens(r).tolist() for r in rs] for rs in rows]
    np.testing.assert_allclose(got[0]["scores"], vecs[0] @ bank.vectors(np.array(rows[0])).T,
                               rtol=1e-5)
    t = http.post("/search/text", json={"texts": [doc.text], "k": 2}).json()["results"]
    assert t[0]["doc_ids"] == exact_search(bank, encoder.embed_texts([doc.text]), 2)[0]
    # Images: exact search of each image's embedding computed here, for test images whose
    # answer float rounding (the server embeds in its own batch) cannot change.
    images = [d.image for d in synthetic_documents(split="test", num=10) if d.image is not None]
    vectors = encoder.embed_images(images)
    clear = np.flatnonzero(clear_of_ties(bank, vectors, 2))
    assert clear.size >= 2, "fewer than two test images clear of ties; take more of them"
    for i in clear[:2]:
        r = http.post("/search/image?k=2", content=encode_png(images[i]),
                      headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["doc_ids"] == exact_search(bank, vectors[i:i + 1], 2)[0]


def test_png_decoding_and_search_run_off_the_event_loop(http, retriever, doc, monkeypatch):
    """Both synchronous steps of an image request (PNG decoding, the encoder + search) run
    in the thread pool, where no event loop runs: done on the loop, either would stall
    every other request while it works."""
    from cm3leon_jax.retrieval import server
    where = []

    def observed(fn):
        def run(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                where.append((fn.__name__, "event loop"))
            except RuntimeError:
                where.append((fn.__name__, "thread pool"))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(server, "decode_png", observed(server.decode_png))
    monkeypatch.setattr(retriever, "search_images", observed(retriever.search_images))
    r = http.post("/search/image?k=2", content=encode_png(doc.image))
    assert r.status_code == 200, r.text
    assert where == [("decode_png", "thread pool"), ("search_images", "thread pool")]


def _corrupt_png(image):
    data = bytearray(encode_png(image))
    data[40:60] = b"\x00" * 20
    return bytes(data)


@pytest.mark.parametrize("make, status, reason", [
    (lambda h, d: h.post("/search/vector", content=b"{not json",
                         headers={"content-type": "application/json"}), 422, "JSON"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 5]}), 400, "16-d"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16], "k": 99}), 400, "k=99"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16] * 9}), 413, "at most 8"),
    (lambda h, d: h.post("/search/vector", json={"vectors": []}), 400, "empty"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16], "nope": 1}), 422, "nope"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16], "exclude_doc_ids": []}),
     400, "exclude_doc_ids"),
    (lambda h, d: h.post("/search/text", json={"texts": [" "]}), 400, "empty"),
    (lambda h, d: h.post("/search/text", json={"texts": "a red circle"}), 422, "list"),
    (lambda h, d: h.post("/search/image", content=b"GIF89a....",
                         headers={"content-type": "image/png"}), 415, "not a PNG"),
    (lambda h, d: h.post("/search/image", content=_corrupt_png(d.image)), 400, "does not decode"),
    (lambda h, d: h.post("/search/image", content=encode_png(np.zeros((200, 200, 3), np.uint8))),
     413, "pixels"),
    (lambda h, d: h.post("/search/image?k=0", content=encode_png(d.image)), 400, "k=0"),
    (lambda h, d: h.post("/search/vector", content=b"x" * 300_000,
                         headers={"content-type": "application/json"}), 413, "at most 200000"),
    (lambda h, d: h.get("/search/vector"), 405, ""),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[1e39] * 16]}), 400, "float32"),
    (lambda h, d: h.post("/search/text", content=b'{"texts": ["caf\xe9 \xff"]}',
                         headers={"content-type": "application/json"}), 400, ""),
    (lambda h, d: h.post("/search/vector", content=b'{"vectors": [[0.1, 0.2',
                         headers={"content-type": "application/json"}), 422, "JSON"),
    (lambda h, d: h.post("/search/image", content=encode_png(d.image)[:60]), 400,
     "does not decode"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16, [0.0] * 16]}), 400,
     "vector 1 is all zeros"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[1e-46] * 16]}), 400,
     "all zeros"),
    (lambda h, d: h.post("/search/text", content=b'{"texts": ["ok", "a \\ud800 b"]}',
                         headers={"content-type": "application/json"}), 400,
     "text 1 holds a lone surrogate"),
    # Strict models: wrong types are refused, not coerced.
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16], "k": True}), 422,
     "valid integer"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16], "k": "3"}), 422,
     "valid integer"),
    (lambda h, d: h.post("/search/text", json={"texts": ["a red circle"], "k": "2"}), 422,
     "valid integer"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [["1"] + [0.1] * 15]}), 422,
     "valid number"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[True] + [0.1] * 15]}), 422,
     "valid number"),
    (lambda h, d: h.post("/search/vector", json={"vectors": [[0.1] * 16],
                                                 "exclude_doc_ids": [7]}), 422, "valid string"),
    (lambda h, d: h.post("/search/text", json={"texts": [3]}), 422, "valid string"),
])
def test_bad_requests_get_4xx_with_a_reason(http, doc, make, status, reason):
    r = make(http, doc)
    assert r.status_code == status, r.text
    assert reason in r.text
    assert http.get("/health").status_code == 200


def test_vectors_are_scaled_to_unit_length_and_json_integers_are_numbers(http, retriever):
    """Scores are cosines, whatever the query's length; a vector of JSON integers (JSON has
    one number type) is as valid as one of floats."""
    vec = retriever.bank.vectors(np.array([3]))
    want = http.post("/search/vector", json={"vectors": vec.tolist(), "k": 3}).json()["results"]
    got = http.post("/search/vector", json={"vectors": (vec * 7).tolist(), "k": 3})
    assert got.status_code == 200, got.text
    assert got.json()["results"][0]["doc_ids"] == want[0]["doc_ids"]
    np.testing.assert_allclose(got.json()["results"][0]["scores"], want[0]["scores"], atol=1e-6)
    ints = http.post("/search/vector", json={"vectors": [[1] + [0] * 15], "k": 2})
    assert ints.status_code == 200, ints.text
    floats = http.post("/search/vector", json={"vectors": [[1.0] + [0.0] * 15], "k": 2})
    assert ints.json() == floats.json()


def test_text_search_reports_truncated_texts(http, retriever, doc, caplog):
    """Texts past the encoder's 32-token context are cut (CLIP's behavior) and the answer
    says which, per text; the server logs nothing per request for it."""
    long = " ".join(["green triangle"] * 40)
    caplog.clear()
    r = http.post("/search/text", json={"texts": [doc.text, long], "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [False, True]
    assert not any("context" in m for m in caplog.messages)
    assert r.json()["results"][1]["doc_ids"] == retriever.search_texts([long], k=2)[0].doc_ids


def test_16_bit_png_is_scaled_to_8_bits(http, retriever):
    """A 16-bit grayscale PNG (PIL mode I;16) is read as 8 bits (value / 257), as the
    training data is, not clipped to white; it finds what its 8-bit version finds."""
    from PIL import Image as PILImage

    from cm3leon_jax.retrieval.server import ServiceLimits, decode_png
    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    PILImage.fromarray(wide).save(buf, format="PNG")
    assert PILImage.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    eight = np.round(wide / 257).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(buf.getvalue(), ServiceLimits()),
                                  np.repeat(eight[..., None], 3, axis=-1))
    got = http.post("/search/image?k=2", content=buf.getvalue())
    assert got.status_code == 200, got.text
    want = http.post("/search/image?k=2", content=encode_png(eight))
    assert got.json() == want.json()


def test_client_refuses_images_that_are_not_uint8_before_sending():
    """The client checks images as the local Retriever does: a float image is refused,
    never cast to uint8 garbage (no server is needed to find out)."""
    from cm3leon_jax.errors import UserInputError
    float_image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    with RetrievalClient("http://127.0.0.1:9", timeout=1, retries=0) as client:
        with pytest.raises(UserInputError, match="image 1 has shape .* float32; expected uint8"):
            client.search_images([np.zeros((32, 32, 3), np.uint8), float_image])
    with pytest.raises(UserInputError, match="uint8"):
        encode_png(float_image)


def test_served_by_the_gin_run_mode_and_the_client(retrieval_dir, retriever, doc):
    """`main --gin_file=gin_configs/runs/serve_retrieval.gin` serves; the client matches local."""
    with ServerProcess(retrieval_dir, SERVE_BINDINGS) as server:
        client = RetrievalClient(server.url, timeout=60)
        assert client.health()["can_encode"]
        local = Retriever.open(retrieval_dir, dataclasses.replace(SELECTION, k=2))
        assert (client.search_texts([doc.text])[0].doc_ids
                == local.search_texts([doc.text])[0].doc_ids)
        long = " ".join(["green triangle"] * 40)
        assert [r.truncated for r in client.search_texts([doc.text, long])] == [False, True]
        got = client.search_images([doc.image], k=3)[0]
        assert got.doc_ids == local.search_images([doc.image], 3)[0].doc_ids
        vec = retriever.bank.vectors(np.array([9]))
        assert client.search_vectors(vec, 3, ["train_0000009"])[0].doc_ids == \
            local.search_vectors(vec, 3, ["train_0000009"])[0].doc_ids
        with pytest.raises(ValueError, match="k=1000"):
            client.search_vectors(vec, 1000)
        # More queries than the service takes at once go in several requests; none, none.
        many = retriever.bank.vectors(np.arange(5))
        small = RetrievalClient(server.url, timeout=60, batch_size=2)
        assert [r.doc_ids for r in small.search_vectors(many, 3)] == [
            r.doc_ids for r in local.search_vectors(many, 3)]
        assert small.search_texts([doc.text] * 3)[2].doc_ids == \
            local.search_texts([doc.text])[0].doc_ids
        assert client.search_vectors(np.zeros([0, retriever.dim], np.float32)) == []
        assert client.search_texts([]) == []
        assert client.health()["status"] == "ok"
        _short_load(server, retriever, doc)


def _short_load(server, retriever, doc):
    """8 clients for 3 s on loopback, one request in four invalid (k=99): the server's own
    counts of answered and rejected requests add up to what the test sent, counted here
    (not by the load tester), and nothing is lost."""
    before = httpx.get(server.url + "/health").json()["requests"]
    good = load_generator.mixed_requests(
        load_generator.vector_requests(retriever.bank.vectors(np.arange(32)), k=3),
        load_generator.text_requests([doc.text]), load_generator.image_requests([doc.image]))
    made = itertools.count()
    invalid = set()

    def make(i):
        n = next(made)
        if n % 4 == 1:
            invalid.add(n)
            return "/search/vector", {"json": {"vectors": [[0.1] * retriever.dim], "k": 99}}
        return good(n)

    report = load_generator.run_load(server.url, make, concurrency=8, seconds=3, timeout=60)
    after = httpx.get(server.url + "/health").json()["requests"]
    sent = next(made)
    answered = after["answered"] - before["answered"]
    rejected = after["rejected"] - before["rejected"]
    assert sent >= 2 and after["failed"] == before["failed"], (report, after)
    assert answered + rejected == sent, (sent, answered, rejected, report)
    assert rejected == len(invalid) and answered == sent - len(invalid)
    assert (report["sent"], report["ok"], report["errors"], report["lost"]) == (
        sent, answered, rejected, 0)


@pytest.mark.slow
def test_load_on_loopback_has_no_errors_and_loses_nothing(retrieval_dir, retriever, doc):
    vectors = retriever.bank.vectors(np.arange(64))
    texts = [d.text for d in synthetic_documents(split="test", num=16) if d.text]
    make = load_generator.mixed_requests(load_generator.vector_requests(vectors, k=3),
                                    load_generator.text_requests(texts),
                                    load_generator.image_requests([doc.image]))
    with ServerProcess(retrieval_dir, SERVE_BINDINGS) as server:
        report = load_generator.run_load(server.url, make, concurrency=32, seconds=15)
        assert httpx.get(server.url + "/health").status_code == 200
    print(report)
    assert report["errors"] == 0 and report["lost"] == 0 and report["unaccounted"] == 0, report
    assert report["ok"] == report["sent"] > 100
