"""Load testing the retrieval service on loopback: many concurrent clients, bounded time.

    with ServerProcess(retrieval_dir) as server:
        report = run_load(server.url, vector_requests(bank_vectors), concurrency=32, seconds=20)
    report["p50_ms"], report["p99_ms"], report["requests_per_s"], report["errors"], report["lost"]

Every request sent is accounted for: answered with 200 (`ok`), answered with
anything else (`errors`), or failed in transport or by timeout (`lost`). Clients
stop sending at the deadline and wait for their last answer, so nothing is left
in flight. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Callable, Sequence

import httpx
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.retrieval.client import encode_png

# A request: (method path, keyword arguments for httpx).
Request = tuple[str, dict]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m cm3leon_jax.main --gin_file=serve_retrieval.gin` in a child process."""

    def __init__(self, retrieval_dir: str, bindings: Sequence[str] = (), port: int | None = None,
                 startup_timeout: float = 180.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [sys.executable, "-m", "cm3leon_jax.main",
                      "--gin_file=gin_configs/runs/serve_retrieval.gin",
                      # The server's own MODEL_DIR (config.gin) stays out of the built folder.
                      f"--gin.MODEL_DIR='{tempfile.mkdtemp(prefix='serve_retrieval_')}'",
                      f"--gin.serve_retrieval.retrieval_dir='{fs.abspath(retrieval_dir)}'",
                      f"--gin.serve_retrieval.port={self.port}",
                      *[f"--gin.{b}" for b in bindings]]
        self._timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        self.proc = subprocess.Popen(self._args, cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + self._timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the retrieval server exited while starting:\n"
                                   + self.proc.stdout.read().decode()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"the retrieval server did not answer /health within {self._timeout}s.")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vector_requests(vectors: np.ndarray, k: int = 2, batch: int = 1) -> Callable[[int], Request]:
    """The i-th request searches `batch` rows of `vectors`, cycling."""
    rows = [np.asarray(vectors[i:i + batch], np.float32).tolist()
            for i in range(0, len(vectors) - batch + 1, batch)]
    return lambda i: ("/search/vector", {"json": {"vectors": rows[i % len(rows)], "k": k}})


def text_requests(texts: Sequence[str], k: int = 2) -> Callable[[int], Request]:
    return lambda i: ("/search/text", {"json": {"texts": [texts[i % len(texts)]], "k": k}})


def image_requests(images: Sequence[np.ndarray], k: int = 2) -> Callable[[int], Request]:
    pngs = [encode_png(im) for im in images]
    return lambda i: ("/search/image", {"content": pngs[i % len(pngs)], "params": {"k": k},
                                        "headers": {"content-type": "image/png"}})


def mixed_requests(*makers: Callable[[int], Request]) -> Callable[[int], Request]:
    return lambda i: makers[i % len(makers)](i // len(makers))


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    ok = host == "localhost" or (host.replace(".", "").isdigit() or ":" in host) and \
        ipaddress.ip_address(host).is_loopback
    if not ok:
        raise ValueError(f"load tests only target loopback addresses, got {host!r}.")


async def _worker(http: httpx.AsyncClient, make: Callable[[int], Request], counter, deadline: float,
                  out: dict) -> None:
    while time.perf_counter() < deadline:
        i = next(counter)
        path, kwargs = make(i)
        out["sent"] += 1
        t = time.perf_counter()
        try:
            r = await http.post(path, **kwargs)
        except (httpx.TransportError, httpx.TimeoutException) as e:
            out["lost"] += 1
            out["lost_examples"].append(f"{type(e).__name__}: {e}")
            continue
        out["latencies"].append(time.perf_counter() - t)
        if r.status_code == 200:
            out["ok"] += 1
        else:
            out["errors"] += 1
            out["error_examples"].append(f"{r.status_code}: {r.text[:200]}")


async def _run(url: str, make, concurrency: int, seconds: float, timeout: float) -> dict:
    import itertools
    out = {"sent": 0, "ok": 0, "errors": 0, "lost": 0, "latencies": [],
           "error_examples": [], "lost_examples": []}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        counter = itertools.count()
        start = time.perf_counter()
        await asyncio.gather(*[_worker(http, make, counter, start + seconds, out)
                               for _ in range(concurrency)])
        out["wall_s"] = time.perf_counter() - start
    return out


def run_load(url: str, make: Callable[[int], Request], concurrency: int = 32,
             seconds: float = 20.0, timeout: float = 60.0) -> dict:
    """Runs `concurrency` clients for `seconds`; returns counts, latency percentiles, throughput."""
    _check_loopback(url)
    out = asyncio.run(_run(url, make, concurrency, seconds, timeout))
    lat = np.array(out.pop("latencies")) * 1e3
    return {
        "concurrency": concurrency, "seconds": round(out["wall_s"], 2),
        "sent": out["sent"], "ok": out["ok"], "errors": out["errors"], "lost": out["lost"],
        "unaccounted": out["sent"] - out["ok"] - out["errors"] - out["lost"],
        "requests_per_s": round(out["ok"] / out["wall_s"], 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "max_ms": round(float(lat.max()), 2) if lat.size else None,
        "error_examples": out["error_examples"][:5], "lost_examples": out["lost_examples"][:5],
    }
