"""CPU kernels as XLA FFI custom calls (`cpu_kernels.cc`): the decode step's two memory-bound
parts, and FlashAttention for training.

    packed = cpu_kernels.pack(kernel, n_in=1)       # [in..., out...] -> Packed, once
    y = cpu_kernels.matvec(x2, packed)              # x2 [rows, in] -> float32 [rows, out]
    out = cpu_kernels.one_query_attention(q, keys, values, visible)
    out = cpu_kernels.flash_attention(q, k, v, q_seg, kv_seg, 0)   # attention_impl = "cpu"
    d_logits, log_z, target_logit = cpu_kernels.softmax_grad(logits, targets, g, z_loss)
    threshold = cpu_kernels.nucleus_threshold(keys, probs, p)  # TopP(p, cpu_kernel=True)

Decoding one token reads every weight for a handful of rows (the batch; twice that with
CFG), so the decode step is bound by how fast the weights stream from memory. XLA:CPU's dot
reads a `[K, N]` matrix for 4 rows at about half the host's streaming rate, and no layout or
XLA flag tried changed that (`benchmarks/RESULTS_decode.md`). `cpu_kernels.cc` stores a
matrix as tiles `[N / C, K, C]` of C columns (`tile_columns()`: as many as 4 rows' sums fit
in the host's vector registers, 64 with AVX-512 and 16 with AVX2), each one contiguous block
read once, prefetched ahead, with the rows' partial sums in registers, and splits the tiles
over XLA's intra-op threads. `one_query_attention` reads each row's keys and values once,
only the slots the row sees (XLA's two batched products read the whole cache, written or
not, at a small-matrix rate). Both run inside the compiled sampler loop like any other op
(no host round trip). `flash_attention` (forward and backward by hand, `jax.custom_vjp`)
keeps the scores in 4 x 64 tiles instead of [batch, heads, length, length] arrays
(`RESULTS_train.md`).

`DecoderStep(config, cpu_kernels=True)` uses `matvec` for every product of a step with at
most `MAX_ROWS` rows and `one_query_attention` for a one-token step; wider products (the
prefill) read the same tiles through XLA's dot. Weights stay float32 or bfloat16 (bfloat16
tiles are widened in registers; the sums are float32). CPU only, one device.
`DecoderConfig.attention_impl = "cpu"` selects `flash_attention` (float32 inside).

The kernels are compiled on first use with the host's C++ compiler (`$CXX`, else `g++`, with
`-march=native`) into `$CM3LEON_JAX_CACHE` (default `~/.cache/cm3leon_jax`), keyed by the
source, the compiler, jaxlib and the CPU, and reused after that.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cm3leon_jax.errors import UserInputError

MAX_ROWS = 16  # wider products go through XLA's dot: they are not bound by the weights' read

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
_TARGETS = {("matvec", jnp.dtype(jnp.float32)): "Cm3leonMatVecF32",
            ("matvec", jnp.dtype(jnp.bfloat16)): "Cm3leonMatVecBF16",
            ("attention", jnp.dtype(jnp.float32)): "Cm3leonAttentionF32",
            ("attention", jnp.dtype(jnp.bfloat16)): "Cm3leonAttentionBF16",
            ("flash_forward", jnp.dtype(jnp.float32)): "Cm3leonFlashForward",
            ("flash_backward", jnp.dtype(jnp.float32)): "Cm3leonFlashBackward",
            ("softmax_grad", jnp.dtype(jnp.float32)): "Cm3leonSoftmaxGrad",
            ("nucleus_threshold", jnp.dtype(jnp.float32)): "Cm3leonNucleusThreshold"}


class KernelUnavailableError(RuntimeError):
    """The CPU kernels cannot be built here (no C++ compiler, or it failed on the source)."""


class NoCompilerError(KernelUnavailableError, UserInputError):
    """No C++ compiler to build the kernels: the host's setup to mend, or the kernels to
    leave off (one `error:` line naming both, exit status 2), not a bug."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tiles"],
                   meta_fields=["in_shape", "out_shape"])
@dataclasses.dataclass(frozen=True)
class Packed:
    """A matrix `[*in_shape, *out_shape]` as tiles `[ceil(out / C), in, C]` (zero-padded), C
    the tile width of the host that packed it (`tile_columns()`): repack on another host."""

    tiles: jax.Array
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def dtype(self):
        return self.tiles.dtype

    def unpack(self) -> jax.Array:
        """The `[in, out]` matrix (2-D) the tiles hold."""
        t, k, c = self.tiles.shape
        return jnp.swapaxes(self.tiles, 0, 1).reshape(k, t * c)[:, :math.prod(self.out_shape)]


@functools.cache
def tile_columns() -> int:
    """The tiles' width this host's `matvec` reads (builds the kernels if need be)."""
    return int(_library().Cm3leonMatVecColumns())


def pack(kernel: jax.Array, n_in: int) -> Packed:
    """`kernel: [*in, *out]` (float32 or bfloat16) -> `Packed` tiles for this host's `matvec`."""
    dtype = jnp.dtype(kernel.dtype)
    if ("matvec", dtype) not in _TARGETS:
        raise ValueError(f"cpu_kernels.pack: weights of dtype {dtype}; the kernel reads float32 "
                         "or bfloat16 (set DecoderConfig.param_dtype or dtype to one of them).")
    in_shape, out_shape = tuple(kernel.shape[:n_in]), tuple(kernel.shape[n_in:])
    k, n = math.prod(in_shape), math.prod(out_shape)
    width = tile_columns()
    tiles = -(-n // width)
    w = jnp.pad(kernel.reshape(k, n), ((0, 0), (0, tiles * width - n)))
    return Packed(jnp.swapaxes(w.reshape(k, tiles, width), 0, 1), in_shape, out_shape)


def matvec(x: jax.Array, packed: Packed) -> jax.Array:
    """`x: [rows, in]` times the packed matrix -> float32 `[rows, out]` (flattened out axes).

    x is read as float32. Any number of rows is correct; past `MAX_ROWS` XLA's dot is faster.
    """
    name = _register("matvec", jnp.dtype(packed.dtype))
    t, k, width = packed.tiles.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"cpu_kernels.matvec: x {x.shape} against tiles of {k} inputs")
    if width != tile_columns():
        raise ValueError(f"cpu_kernels.matvec: tiles of {width} columns, but this host's kernel "
                         f"reads {tile_columns()}: pack the weights on the host that runs them "
                         "(DecoderStep.prepare on the params, not a prepared copy from elsewhere).")
    y = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((x.shape[0], t * width), jnp.float32))(
            x.astype(jnp.float32), packed.tiles)
    return y[:, :math.prod(packed.out_shape)]


def one_query_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                        visible: jax.Array) -> jax.Array:
    """One query per row and head against the cache -> float32 `[B, H, G, D]`.

    q: `[B, H, G, D]` (G queries per kv head, already scaled by 1/sqrt(D)); keys, values:
    the cache `[B, H, L, D]` (float32 or bfloat16); visible: bool `[B, L]`, the slots each
    row sees. Softmax over the visible slots (a row that sees none averages every slot, as
    XLA's masked softmax does); slots a row does not see are never read.
    """
    dtype = jnp.dtype(keys.dtype)
    if ("attention", dtype) not in _TARGETS or values.dtype != dtype:
        raise ValueError(f"cpu_kernels.one_query_attention: a cache of {keys.dtype} / "
                         f"{values.dtype}; the kernel reads float32 or bfloat16.")
    name = _register("attention", dtype)
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q.astype(jnp.float32), keys, values, visible.astype(bool))


def flash_attention(query, key, value, query_segment_ids, kv_segment_ids, query_offset):
    """Causal attention over whole sequences, the `attention_impl = "cpu"` kernel.

    The seam of `attention.py`'s kernels: query `[b, t, heads, d]`, key and value
    `[b, s, kv_heads, d]`, segment ids `[b, t]` / `[b, s]` or None, a static int
    `query_offset`. Float32; forward and backward are `cpu_kernels.cc`'s FlashAttention
    loops (scores never stored beyond a 4 x 64 tile, recomputed in the backward pass
    from the saved log-sum-exp).
    """
    if not isinstance(query_offset, int):
        raise ValueError("attention_impl='cpu' needs a static query_offset (training, a "
                         "prefill from slot 0); decode steps use DecoderStep(cpu_kernels=True).")
    check_one_cpu_device("DecoderConfig.attention_impl='cpu'", "choose \"chunked\" or \"xla\"")
    b, t = query.shape[:2]
    s = key.shape[1]
    if query_segment_ids is None:
        query_segment_ids = jnp.zeros((b, t), jnp.int32)
        kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    dtype = query.dtype
    out = _flash(query.astype(jnp.float32), key.astype(jnp.float32),
                 value.astype(jnp.float32), query_segment_ids.astype(jnp.int32),
                 kv_segment_ids.astype(jnp.int32), query_offset)
    return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qseg, kseg, offset):
    return _flash_forward(q, k, v, qseg, kseg, offset)[0]


def _flash_forward(q, k, v, qseg, kseg, offset):
    b, t, h, _ = q.shape
    out, lse = jax.ffi.ffi_call(
            _register("flash_forward", jnp.dtype(jnp.float32)),
            (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct((b, h, t), jnp.float32)))(q, k, v, qseg, kseg,
                                                            offset=np.int64(offset))
    return out, (q, k, v, qseg, kseg, out, lse)


def _flash_backward(offset, residuals, d_out):
    q, k, v, qseg, kseg, out, lse = residuals
    dq, dk, dv = jax.ffi.ffi_call(
            _register("flash_backward", jnp.dtype(jnp.float32)),
            (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
             jax.ShapeDtypeStruct(v.shape, jnp.float32)))(
            q, k, v, qseg, kseg, out, lse, d_out.astype(jnp.float32), offset=np.int64(offset))
    zeros = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dq, dk, dv, zeros(qseg), zeros(kseg)


_flash.defvjp(_flash_forward, _flash_backward)


def softmax_grad(logits: jax.Array, targets: jax.Array, g: jax.Array, z_loss: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The loss's softmax statistics and logits gradient for a chunk of tokens, in one kernel.

    logits: float32 `[N, V]`; targets: int `[N]`; g: float32 `[N]`, each token's weight in
    the loss `sum_n g[n] * (log_z - target_logit + z_loss * log_z^2)`. Returns
    `(d_logits [N, V], log_z [N], target_logit [N])`: that sum's gradient with respect to
    the logits, `softmax * g * (1 + 2 z_loss log_z) - g * onehot(target)`, written over the
    logits' buffer where XLA can give it (a target outside `[0, V)` has target_logit 0 and
    no one-hot). Not differentiable itself: `loss.fused_head_loss` calls it inside its own
    gradient (`DecoderConfig.loss_impl = "cpu"`).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or g.shape != logits.shape[:1]:
        raise ValueError(f"cpu_kernels.softmax_grad: logits {logits.shape}, targets "
                         f"{targets.shape} and g {g.shape} must be [N, V], [N] and [N].")
    check_one_cpu_device("DecoderConfig.loss_impl='cpu'", "choose \"xla\"")
    n, v = logits.shape
    return jax.ffi.ffi_call(
            _register("softmax_grad", jnp.dtype(jnp.float32)),
            (jax.ShapeDtypeStruct((n, v), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
             jax.ShapeDtypeStruct((n,), jnp.float32)),
            input_output_aliases={0: 0})(
            logits.astype(jnp.float32), targets.astype(jnp.int32), g.astype(jnp.float32),
            z_loss=np.float32(z_loss))


def nucleus_threshold(keys: jax.Array, probs: jax.Array, p) -> jax.Array:
    """`processors.nucleus_threshold` in C++: int32 `[..., 1]`, each row's top-p threshold.

    The same 32 halvings of the int32 key range, each a masked sum over the row, in one
    kernel call instead of 32 of XLA's reductions (XLA:CPU gives each to YNNPACK: top-p took
    0.32-0.91 ms a decode step for 4 x 9216 scores, the reductions' cost moving between
    processes, against 0.15 ms with this; `RESULTS_decode.md`). Its sums run in another
    order than XLA's, so where the mass above a key lies within float rounding of p the two
    can keep a different set. keys: int32 `[..., V]`; probs: float32 `[..., V]`; p: a scalar
    (traced or not).
    """
    if keys.shape != probs.shape or keys.ndim < 1 or keys.shape[-1] == 0:
        raise ValueError(f"cpu_kernels.nucleus_threshold: keys {keys.shape} and probs "
                         f"{probs.shape} must be the same [..., V] with V > 0.")
    check_one_cpu_device("TopP(cpu_kernel=True)", "leave cpu_kernel off")
    lead, v = keys.shape[:-1], keys.shape[-1]
    rows = math.prod(lead)
    out = jax.ffi.ffi_call(_register("nucleus_threshold", jnp.dtype(jnp.float32)),
                           jax.ShapeDtypeStruct((rows,), jnp.int32))(
            keys.reshape(rows, v).astype(jnp.int32), probs.reshape(rows, v).astype(jnp.float32),
            jnp.broadcast_to(jnp.asarray(p, jnp.float32), (rows,)))
    return out.reshape(lead + (1,))


def check_one_cpu_device(what: str, instead: str) -> None:
    """The kernels run on one CPU device, unsharded (no rule splits a custom call)."""
    mesh = jax.sharding.get_abstract_mesh()
    if jax.default_backend() != "cpu" or (not mesh.empty and mesh.size > 1):
        raise ValueError(f"{what} runs on one CPU device, unsharded; here the backend is "
                         f"{jax.default_backend()!r} and the mesh "
                         f"{dict(mesh.shape) if not mesh.empty else 'none'}: {instead}.")


# -- building and registering -------------------------------------------------------------
def _cache_dir() -> str:
    root = os.environ.get("CM3LEON_JAX_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cm3leon_jax")
    return os.path.join(root, "kernels")


def _read_local(path: str) -> str:
    """A file of this host (the package's own source, /proc/cpuinfo): never a user path."""
    with open(path) as f:
        return f.read()


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = _read_local("/proc/cpuinfo").splitlines()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))  # the first core's lines, once each


def build() -> None:
    """Build the kernels now (or find the cached build); `KernelUnavailableError` says what
    to do where they cannot be built. A run that will use them calls it before its work."""
    _library()


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile cpu_kernels.cc once per (source, compiler, jaxlib, CPU); load it."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise NoCompilerError(
                f"cpu_kernels: no C++ compiler ({compiler!r}, from $CXX or the default g++) to "
                f"build {os.path.basename(_SOURCE)}; install one (Debian: apt install g++) or "
                "leave the kernels off: DecoderConfig.attention_impl = \"chunked\" to train, "
                "Generator.cpu_kernels = False (DecoderStep(cpu_kernels=False)) to decode.")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
             f"-I{jax.ffi.include_dir()}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([_read_local(_SOURCE), " ".join(flags), version,
                                    jaxlib.__version__, _cpu_signature()]).encode()).hexdigest()
    folder = _cache_dir()
    out = os.path.join(folder, f"cpu_kernels-{key[:16]}.so")
    if not os.path.exists(out):
        os.makedirs(folder, exist_ok=True)
        # Compile beside the target and rename: concurrent builders never see half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        done = subprocess.run([compiler, *flags, _SOURCE, "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode:
            os.unlink(tmp)
            raise KernelUnavailableError(f"cpu_kernels: {compiler} failed on {_SOURCE}:\n"
                                         f"{done.stderr[-2000:]}")
        os.replace(tmp, out)
    return ctypes.cdll.LoadLibrary(out)


@functools.cache
def _register(kind: str, dtype) -> str:
    symbol = _TARGETS[kind, dtype]
    name = f"cm3leon_{kind}_{dtype.name}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(_library(), symbol)),
                                platform="cpu")
    return name
