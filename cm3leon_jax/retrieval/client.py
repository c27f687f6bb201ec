"""An HTTP client for the retrieval service with the `Retriever`'s search methods.

    r = RetrievalClient("http://127.0.0.1:8750")
    [res] = r.search_texts(["a red circle"], k=2)   # same SearchResult as Retriever's

Generation code that takes "a retriever" accepts either this or a local
`Retriever`. A 4xx answer raises `ValueError` with the server's reason; network
failures raise httpx's errors after `retries` attempts. Images are checked as the local
`Retriever` checks them (uint8 RGB, `encoder.check_image`) before they are sent; text
results carry the service's `truncated` flags, and a call with texts cut to the
encoder's context logs one warning, as the local retriever does.
"""

from __future__ import annotations

import io
from typing import Sequence

import httpx
import numpy as np
from PIL import Image as PILImage

from cm3leon_jax.errors import UserInputError
from cm3leon_jax.retrieval.encoder import check_batch, check_image, warn_truncated
from cm3leon_jax.retrieval.retriever import SearchResult


def encode_png(image: np.ndarray, i: int = 0) -> bytes:
    """uint8[h, w, 3] (or [h, w], [h, w, 4]) -> PNG bytes; UserInputError for anything else
    (`check_image`: a float image is never silently cast)."""
    buf = io.BytesIO()
    PILImage.fromarray(check_image(image, i)).save(buf, format="PNG")
    return buf.getvalue()


class RetrievalClient:
    """A `Retriever` over HTTP (`server.py`): a batch larger than the service takes in one
    request (`batch_size`, its `ServiceLimits.max_batch`) goes in several, and an empty one
    asks nothing. k is capped by the service (`ServiceLimits.max_k`), not here."""

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 2,
                 batch_size: int = 64):
        if batch_size < 1:
            raise UserInputError(f"RetrievalClient batch_size={batch_size}: give 1 or more "
                                 "(the service's max_batch).")
        self.batch_size = batch_size
        self._http = httpx.Client(base_url=base_url, timeout=timeout,
                                  transport=httpx.HTTPTransport(retries=retries))

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _post(self, path: str, **kwargs) -> list[SearchResult]:
        r = self._http.post(path, **kwargs)
        if 400 <= r.status_code < 500:
            raise ValueError(f"retrieval service refused the request ({r.status_code}): "
                             f"{r.json().get('detail')}")
        r.raise_for_status()
        answer = r.json()
        truncated = answer.get("truncated") or [False] * len(answer["results"])
        return [SearchResult(x["doc_ids"], x["scores"],
                             [np.asarray(t, np.int32) for t in x["token_ids"]], [], bool(cut))
                for x, cut in zip(answer["results"], truncated)]

    def health(self) -> dict:
        r = self._http.get("/health")
        r.raise_for_status()
        return r.json()

    @property
    def dim(self) -> int:
        return int(self.health()["dim"])

    def search_vectors(self, vectors: np.ndarray, k: int | None = None,
                       exclude_doc_ids: Sequence[str | None] | None = None) -> list[SearchResult]:
        vectors = np.asarray(vectors, np.float32)
        out = []
        for start in range(0, len(vectors), self.batch_size):  # The service's batch limit.
            body = {"vectors": vectors[start:start + self.batch_size].tolist(), "k": k}
            if exclude_doc_ids is not None:
                body["exclude_doc_ids"] = list(exclude_doc_ids[start:start + self.batch_size])
            out += self._post("/search/vector", json=body)
        return out

    def search_texts(self, texts: Sequence[str], k: int | None = None) -> list[SearchResult]:
        check_batch(texts=texts)
        texts, results = list(texts), []
        for start in range(0, len(texts), self.batch_size):  # The service's batch limit.
            results += self._post("/search/text",
                                  json={"texts": texts[start:start + self.batch_size], "k": k})
        warn_truncated([r.truncated for r in results])
        return results

    def search_images(
        self, images: Sequence[np.ndarray], k: int | None = None
    ) -> list[SearchResult]:
        check_batch(images=images)
        out = []
        pngs = [encode_png(image, i) for i, image in enumerate(images)]  # all checked first
        for png in pngs:  # the service takes one PNG per request
            params = {} if k is None else {"k": k}
            out += self._post("/search/image", content=png,
                              headers={"content-type": "image/png"}, params=params)
        return out
