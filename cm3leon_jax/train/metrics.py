"""Model FLOPs, MFU, and where metrics go (TensorBoard, the console, metrics.jsonl).

FLOPs are counted the way MaxText counts them (`calculate_tflops_training_per_device`):
matmul FLOPs only, 2 per multiply-add, times 3 for a training step (forward, and a
backward pass twice as costly), with causal attention counted at half of the full
`QK^T` and `PV` products::

    per layer:  2*T*d*F*(2 if gated else 1) + 2*T*F*d        MLP
                2*T*d*(H + 2*H_kv)*h + 2*T*H*h*d             q, k, v and output projections
                (4*T*S*H*h) / 2                              causal attention scores and values
    once:       2*T*d*V                                      logits (tied or not)
    train step: 3 * (layers * per_layer + once)              T = tokens, S = sequence length

MFU = achieved model FLOP/s / (devices * peak FLOP/s of one device). Peaks are the
vendors' dense bf16 numbers per JAX device (`PEAK_TFLOPS`); on CPU, where no fixed
number means anything, the peak is measured: the best rate of a large float32 matmul
on this host, shared by its (possibly fake) devices.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np

from cm3leon_jax import fs
from cm3leon_jax.model.config import DecoderConfig

log = logging.getLogger(__name__)

# Dense bf16 TFLOP/s per JAX device, by a substring of `device.device_kind` (longest
# match wins). TPU v2/v3 expose each core as a device; v4 and later, each chip.
PEAK_TFLOPS: dict[str, float] = {
    "TPU v2": 22.5,
    "TPU v3": 61.5,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p reports "TPU v5".
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "B200": 2250.0,
    "L4": 121.0,
}


def train_flops_per_step(config: DecoderConfig, batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step on `batch` rows of `seq_len` tokens (see module doc)."""
    c = config
    tokens = batch * seq_len
    h, heads, kv_heads = c.dims_per_head, c.num_heads, c.kv_heads
    mlp = 2 * tokens * c.d_model * c.mlp_dim * (2 if c.gated_mlp else 1) \
        + 2 * tokens * c.mlp_dim * c.d_model
    projections = 2 * tokens * c.d_model * (heads + 2 * kv_heads) * h \
        + 2 * tokens * heads * h * c.d_model
    attention = 4 * tokens * seq_len * heads * h / 2
    logits = 2 * tokens * c.d_model * c.vocab_size
    return 3.0 * (c.num_layers * (mlp + projections + attention) + logits)


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(sizes: tuple[int, ...] = (512, 1024), repeats: int = 3) -> float:
    """FLOP/s of the fastest float32 `[n, n] @ [n, n]` matmul on device 0 (best over
    `sizes` and `repeats`): the rate this host's matmul library actually reaches."""
    best, device = 0.0, jax.local_devices()[0]
    # A one-device mesh of its own: a mesh in context must neither replicate nor refuse it.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
        for n in sizes:
            x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32),
                               device)
            matmul = jax.jit(lambda a, b: a @ b)
            matmul(x, x).block_until_ready()
            for _ in range(repeats):
                start = time.perf_counter()
                matmul(x, x).block_until_ready()
                best = max(best, 2.0 * n ** 3 / (time.perf_counter() - start))
    return best


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device: the table above, measured on CPU, else None."""
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return measure_matmul_peak() / len(jax.local_devices())
    kind = device.device_kind
    matches = [k for k in PEAK_TFLOPS if k.lower() in kind.lower()]
    if not matches:
        log.warning("no peak FLOP/s known for device kind %r; MFU will not be reported. "
                    "Add it to cm3leon_jax.train.metrics.PEAK_TFLOPS.", kind)
        return None
    return PEAK_TFLOPS[max(matches, key=len)] * 1e12


def throughput(flops_per_step: float, tokens_per_step: int, seconds_per_step: float,
               peak_per_device: float | None, num_devices: int) -> dict[str, float]:
    """tokens/s, per-device TFLOP/s and MFU of steps that took `seconds_per_step`."""
    out = {"tokens_per_sec": tokens_per_step / seconds_per_step,
           "tflops_per_device": flops_per_step / seconds_per_step / num_devices / 1e12,
           "seconds_per_step": seconds_per_step}
    if peak_per_device:
        out["mfu"] = flops_per_step / seconds_per_step / (peak_per_device * num_devices)
    return out


class StepTimer:
    """Seconds per step over the steps seen since the last `lap` or `restart`.

    Call `step_done()` as each step is seen to finish, `restart()` after anything that
    is not training (compilation, checkpointing, evaluation), `lap()` when reporting.
    """

    def __init__(self):
        self._start: float | None = None
        self._steps = 0

    def step_done(self) -> None:
        if self._start is None:  # The first step compiles; time from its end.
            self.restart()
        else:
            self._steps += 1

    def restart(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def lap(self) -> float | None:
        """Mean seconds per step since the last lap (None if no step was timed)."""
        if self._start is None or not self._steps:
            return None
        now = time.perf_counter()
        seconds = (now - self._start) / self._steps
        self._start, self._steps = now, 0
        return seconds


class MetricsWriter:
    """Scalars to TensorBoard, the console and `model_dir/metrics.jsonl` (process 0 only).

    The one metrics writer of the three trainers (decoder, VQGAN, CLIP).
    `tensorboard=False` keeps TensorFlow (which clu's writer imports) out of the process.
    Nothing is created in `model_dir` until the first write, so a run refused after
    making its writer (a checkpoint that does not fit) leaves no events file behind.
    """

    def __init__(self, model_dir: str, tensorboard: bool = True, console: bool = True):
        self.active = jax.process_index() == 0
        self.model_dir, self.tensorboard, self.console = model_dir, tensorboard, console
        self._tb = None
        self._jsonl = None

    def _open(self) -> bool:
        """Opens the outputs on the first write; whether this process writes."""
        if self.active and self._jsonl is None:
            if self.tensorboard:
                from clu import metric_writers  # Imports TensorFlow: only when asked for.
                self._tb = metric_writers.SummaryWriter(self.model_dir)
            fs.makedirs(self.model_dir)
            self._jsonl = fs.open(os.path.join(self.model_dir, "metrics.jsonl"), "a")
        return self.active

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self._open():
            return
        values = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        if self._tb is not None:
            self._tb.write_scalars(step, values)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.console:
            line = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))
            _console(f"step {step}: {line}")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8[n, h, w, c] batches to TensorBoard (nowhere else)."""
        if self._open() and self._tb is not None:
            self._tb.write_images(step, images)

    def write_hparams(self, hparams: Mapping[str, float | int | str]) -> None:
        if self._open() and self._tb is not None:
            self._tb.write_hparams(dict(hparams))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb = self._jsonl = None


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"


def _console(line: str) -> None:
    try:  # Keeps a running progress bar intact.
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(line, flush=True)
