"""The retrieval service: FastAPI over a `Retriever`, and the `serve_retrieval` run mode.

    python -m cm3leon_jax.main --gin_file=gin_configs/runs/serve_retrieval.gin \
        --gin.MODEL_DIR="'runs/demo'" \
        --gin.serve_retrieval.retrieval_dir="'runs/demo/data/retrieval'"
    # serves the demo's bank (the preprocess mode writes it under MODEL_DIR/data/retrieval)
    # on 127.0.0.1:8750; without retrieval_dir, MODEL_DIR/retrieval (build_retrieval's)

    GET  /health                       {"status": "ok", "num_docs", "dim", "can_encode",
                                        "requests": {"answered", "rejected", "failed"}}
    POST /search/vector   JSON         {"vectors": [[f32 x dim], ...], "k": 2,
                                        "exclude_doc_ids": [...]}
    POST /search/text     JSON         {"texts": ["a red circle", ...], "k": 2}
    POST /search/image?k=2  image/png  the PNG file as the body (one image)
    ->  {"results": [{"doc_ids": [...], "scores": [...], "token_ids": [[...], ...]}, ...]}
        /search/text adds "truncated": [bool per text]: true where the text had more
        tokens than the encoder's context (32 for the tiny encoder, 77 for OpenAI's) and
        was cut to it, as CLIP always does; only its beginning was searched.

Query vectors are scaled to unit length (scores are cosines, as the 0.9 relevance
threshold assumes); 16-bit grayscale PNGs are scaled to 8 bits, as training data is.

Limits (`ServiceLimits`): request body size, batch size, k, text length, image
pixels. A request outside them, malformed or non-UTF-8 JSON, a field of the wrong
type (models are strict: "k": "3" or true is refused, not coerced; a JSON integer is
a valid vector entry, an integer-valued float is not a valid k), a vector of the wrong
size, all zeros or not finite in float32, a text with a lone surrogate ("\\ud800"),
or a PNG that does not decode gets a 4xx whose `detail` says what was wrong; errors in
one request never stop the server. Handlers are plain functions, so FastAPI runs them
in its thread pool and ScaNN/JAX work proceeds in parallel across requests; the image
handler decodes its PNG in that pool too, so the event loop only moves bytes.
`/health` counts the search requests the server has finished, by outcome (2xx
answered, 4xx rejected, 5xx failed), so a load test can check its own bookkeeping
against the server's.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import threading
from typing import Any

import gin
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from cm3leon_jax import images
from cm3leon_jax.retrieval.clip_tokenizer import lone_surrogate
from cm3leon_jax.retrieval.retriever import Retriever, SearchResult
from cm3leon_jax.retrieval.select import SelectionConfig


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    max_body_bytes: int = 4 << 20
    max_batch: int = 64
    max_k: int = 32
    max_text_chars: int = 2000
    max_image_pixels: int = 4096 * 4096


# Strict: a wrong type is a 422, never coerced ("3" or true as k, "1" as a vector entry).
# Pydantic's strict mode still takes a JSON integer for a float, as JSON means it.
class VectorQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    vectors: list[list[float]]
    k: int | None = None
    exclude_doc_ids: list[str | None] | None = None


class TextQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str]
    k: int | None = None


def _bad(status: int, detail: str):
    raise HTTPException(status_code=status, detail=detail)


def _check_batch(n: int, limits: ServiceLimits, what: str) -> None:
    if n == 0:
        _bad(400, f"'{what}' is empty; send at least one query.")
    if n > limits.max_batch:
        _bad(413, f"{n} {what} in one request; at most {limits.max_batch}. Split the batch.")


def _check_k(k: int | None, limits: ServiceLimits) -> None:
    if k is not None and not 1 <= k <= limits.max_k:
        _bad(400, f"k={k} is out of range; use 1..{limits.max_k}.")


def _as_json(results: list[SearchResult]) -> dict[str, Any]:
    return {"results": [{"doc_ids": r.doc_ids, "scores": r.scores,
                         "token_ids": [t.tolist() for t in r.token_ids]} for r in results]}


def to_rgb(im: PILImage.Image) -> np.ndarray:
    """A decoded image -> uint8[h, w, 3], by the rule training and generation read image
    files with (`images.pil_rgb`: transparency over white, 16-bit scaled to 8 bits; floats
    and wider integers refused, which `decode_png` answers with 400)."""
    return np.asarray(images.pil_rgb(im))


def decode_png(body: bytes, limits: ServiceLimits) -> np.ndarray:
    """PNG bytes -> uint8[h, w, 3] (`to_rgb`); 4xx on anything else."""
    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        _bad(415, "the body is not a PNG file (bad signature); send the PNG bytes as the body.")
    try:
        with PILImage.open(io.BytesIO(body)) as im:
            if im.width * im.height > limits.max_image_pixels:
                _bad(413, f"image is {im.width}x{im.height}; at most {limits.max_image_pixels} "
                          "pixels.")
            return to_rgb(im)
    except HTTPException:
        raise
    except Exception as e:  # PIL raises many kinds for corrupt files
        _bad(400, f"the PNG does not decode: {type(e).__name__}: {e}")


class RequestCounts:
    """Finished /search requests by outcome; thread-safe (handlers run in a pool)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, status: int) -> None:
        outcome = "answered" if status < 400 else "rejected" if status < 500 else "failed"
        with self._lock:
            self._counts[outcome] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in ("answered", "rejected", "failed")}


def _query_vectors(q: "VectorQuery", dim: int, limits: ServiceLimits) -> np.ndarray:
    """The request's vectors as float32[n, dim]; 4xx for a wrong size, count, NaN or zero."""
    _check_batch(len(q.vectors), limits, "vectors")
    _check_k(q.k, limits)
    if any(len(v) != dim for v in q.vectors):
        bad = next(i for i, v in enumerate(q.vectors) if len(v) != dim)
        _bad(400, f"vector {bad} has {len(q.vectors[bad])} values; the bank holds {dim}-d "
                  "vectors.")
    if q.exclude_doc_ids is not None and len(q.exclude_doc_ids) != len(q.vectors):
        _bad(400, f"exclude_doc_ids has {len(q.exclude_doc_ids)} entries for "
                  f"{len(q.vectors)} vectors; give one (or null) per vector.")
    with np.errstate(over="ignore"):  # 1e39 is a finite JSON number but inf in float32.
        vectors = np.asarray(q.vectors, np.float32)
    if not np.isfinite(vectors).all():
        _bad(400, "vectors hold NaN or infinity (or values beyond float32's range).")
    zero = np.flatnonzero(~vectors.any(axis=1))
    if zero.size:
        _bad(400, f"vector {int(zero[0])} is all zeros (in float32), so it has no direction "
                  "to search in; send a nonzero vector.")
    return vectors


def _check_texts(q: "TextQuery", limits: ServiceLimits) -> None:
    """4xx for an empty, too long or invalid-Unicode text, or a bad count or k."""
    _check_batch(len(q.texts), limits, "texts")
    _check_k(q.k, limits)
    for i, t in enumerate(q.texts):
        if not t.strip():
            _bad(400, f"text {i} is empty.")
        if len(t) > limits.max_text_chars:
            _bad(413, f"text {i} has {len(t)} characters; at most {limits.max_text_chars}.")
        at = lone_surrogate(t)
        if at is not None:
            _bad(400, f"text {i} holds a lone surrogate (character {at}), which is not "
                      "Unicode text; send valid Unicode.")


def create_app(retriever: Retriever, limits: ServiceLimits | None = None) -> FastAPI:
    limits = limits or ServiceLimits()
    app = FastAPI(title="cm3leon-jax retrieval", version="1")
    counts = RequestCounts()

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        response = await _bounded(request, call_next)
        if request.url.path.startswith("/search"):
            counts.add(response.status_code)
        return response

    async def _bounded(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return JSONResponse({"detail": f"request body is {length} bytes; at most "
                                           f"{limits.max_body_bytes}."}, status_code=413)
        if length is None and request.method == "POST":
            return JSONResponse({"detail": "send a Content-Length header (no chunked bodies)."},
                                status_code=411)
        try:
            return await call_next(request)
        except Exception as e:  # pylint: disable=broad-except  # One request fails, not the server.
            return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"},
                                status_code=500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Last resort: the request fails, the server keeps serving.
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"},
                            status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "num_docs": len(retriever.bank), "dim": retriever.dim,
                "can_encode": retriever.encoder is not None, "requests": counts.as_dict()}

    @app.post("/search/vector")
    def search_vector(q: VectorQuery) -> dict:
        vectors = _query_vectors(q, retriever.dim, limits)
        return _as_json(retriever.search_vectors(vectors, q.k, q.exclude_doc_ids))

    @app.post("/search/text")
    def search_text(q: TextQuery) -> dict:
        _check_texts(q, limits)
        if retriever.encoder is None:
            _bad(409, "this server has no encoder; search by vector.")
        # The answer reports texts cut to the encoder's context; no per-request log line.
        results = retriever.search_texts(q.texts, q.k, warn_truncated_texts=False)
        return {**_as_json(results), "truncated": [r.truncated for r in results]}

    @app.post("/search/image")
    async def search_image(request: Request, k: int | None = None) -> dict:
        _check_k(k, limits)
        if retriever.encoder is None:
            _bad(409, "this server has no encoder; search by vector.")
        # Decoding and the encoder are synchronous: both run in the thread pool, as the
        # other handlers do, so a large PNG never stalls the event loop.
        image = await run_in_threadpool(decode_png, await request.body(), limits)
        return _as_json(await run_in_threadpool(retriever.search_images, [image], k))

    return app


@gin.configurable
def serve_retrieval(model_dir: str, retrieval_dir: str | None = None,
                    host: str = "127.0.0.1", port: int = 8750,
                    limits: ServiceLimits | None = None,
                    selection: SelectionConfig | None = None,
                    max_loaded_shards: int | None = None) -> None:
    """Loads `retrieval_dir` (default MODEL_DIR/retrieval) and serves it until stopped."""
    import uvicorn
    directory = retrieval_dir or os.path.join(model_dir, "retrieval")
    retriever = Retriever.open(directory, selection or SelectionConfig(k=2),
                               max_loaded_shards=max_loaded_shards)
    # Compile, load and page in before the first request rather than during it.
    retriever.search_vectors(np.full((1, retriever.dim), retriever.dim ** -0.5, np.float32))
    if retriever.encoder is not None:
        retriever.encoder.embed_texts(["warm up"])
        retriever.encoder.embed_images(np.zeros((1, 8, 8, 3), np.uint8))
    print(f"serving {len(retriever.bank)} documents on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(retriever, limits), host=host, port=port, log_level="warning",
                timeout_keep_alive=30)
