// CPU kernels for cm3leon_jax, as XLA FFI handlers (cpu_kernels.py builds, registers and
// calls them):
//
//   * Cm3leonMatVec{F32,BF16}: y[M, T * C] = x[M, K] @ W[K, T * C], W stored as tiles
//     P[T, K, C] (float32 or bfloat16 bits), x and y float32, C = kMatCols (the host's
//     accumulator width: 64 columns with AVX-512, 16 with AVX2; Cm3leonMatVecColumns says).
//     One generated token reads every weight once for a handful of rows, so a decode step
//     is bound by how fast the weights stream from memory. XLA:CPU's dot reads a [K, N]
//     matrix for 4 rows at about half the host's streaming rate
//     (benchmarks/RESULTS_decode.md); this reads each tile as one contiguous block in one
//     pass, prefetched ahead, with 4 rows' sums of the tile's columns in registers, and
//     splits the tiles over XLA's intra-op threads.
//   * Cm3leonAttention{F32,BF16}: a decode step's one query per row against the KV cache,
//     reading only the slots each row sees.
//   * Cm3leonFlash{Forward,Backward}: causal attention over whole sequences for training,
//     FlashAttention's loops (below).
//   * Cm3leonSoftmaxGrad: the training loss's log-sum-exp and its logits' gradient, a row
//     at a time (below).
//   * Cm3leonNucleusThreshold: top-p's threshold, a row at a time (below).
//
// Written with GCC vector extensions at the host's own vector width (16 floats with AVX-512,
// 8 with AVX2, 4 with SSE or NEON: what -march=native offers), AVX-512 intrinsics only where
// they exist. The width must be the host's: GCC splits a wider vector's arithmetic into
// native halves but turns a select (`mask ? a : b`) into a branch per lane, which made
// these kernels 6-14x slower on an AVX2 host when they were written for 16 lanes everywhere.
// Every sum is taken in the same order at every width except the reductions across lanes
// (HSum, HMax, Dot, TreeSum), so AVX-512 hosts compute what they did before the width became a parameter.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Vector registers: 32 with AVX-512 and on AArch64, 16 with AVX2 and SSE. Accumulators are
// blocked to a quarter of them (kAccVecs vectors a row, 4 rows), so that the operands and
// the broadcast scalars fit beside them without spilling to the stack.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kAccVecs = 4;
#else
constexpr int kAccVecs = 2;
#endif

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));

constexpr int64_t kTile = 64;   // keys per attention block, logits per softmax block
constexpr int kTileVecs = kTile / kLanes;  // vectors in such a block's row
static_assert(kTileVecs % kAccVecs == 0, "a block's row splits into accumulator blocks");

// The matrix-vector product's tiles: kMatCols columns, one vector of accumulators each for
// kRows rows of x at once, so a tile streams from memory in one pass with every sum in a
// register. (Until 6 Dec the tiles were 64 columns everywhere; where 64 columns of 4 rows
// did not fit in the registers, AVX2, each tile went in L1-resident blocks swept once per
// 2 vectors of columns: 15 GB/s on an AMD EPYC Zen 2 host that streams 23-29 GB/s, against
// 26-29 GB/s for these 16-column tiles with the prefetch below; RESULTS_decode.md.)
constexpr int64_t kMatCols = kAccVecs * kLanes;
constexpr int64_t kRows = 4;    // rows of x per pass over a tile
constexpr int64_t kAhead = 32;  // prefetch distance, in rows of a tile
// More than kRows rows: K in chunks of this many bytes of tile, every row block per chunk
// (the later blocks find the chunk in L1).
constexpr int64_t kChunkBytes = 8192;
// The prefetch's temporal locality: 3 (into every level) with AVX-512, the setting the
// Intel Xeon host kind's figures were measured with (0 not tried there); 0 (prefetchnta)
// elsewhere: on the AMD Zen 2 host the product streamed at 26-29 GB/s with it against
// 18-21 GB/s with 1, 2 or 3.
#if defined(__AVX512F__)
constexpr int kLocality = 3;
#else
constexpr int kLocality = 0;
#endif

inline vf Splat(float x) { return vf{} + x; }

inline void Relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf Load(const uint16_t* p) {  // bfloat16 bits -> float32: the high half of the word
  vh h;
  std::memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// R rows of x (row stride K) times rows [k0, k1) of one tile [K, kMatCols]; the sums start
// from zero at k0 = 0 and from y's float32 values after (exactly: every sum adds its
// terms in the order of k). `prefetch`: fetch the tile's rows kAhead ahead.
template <int R, typename W>
inline void TileRows(const float* x, int64_t K, int64_t k0, int64_t k1, const W* tile,
                     float* y, int64_t y_stride, bool prefetch) {
  constexpr int64_t kRowBytes = kMatCols * int64_t(sizeof(W));
  constexpr int64_t kRowsPerLine = kRowBytes >= 64 ? 1 : 64 / kRowBytes;
  vf acc[R][kAccVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kAccVecs; ++j)
      acc[r][j] = k0 == 0 ? vf{} : Load(y + r * y_stride + j * kLanes);
  for (int64_t k = k0; k < k1; ++k) {
    const W* w = tile + k * kMatCols;
    if (prefetch && k % kRowsPerLine == 0) {
      const char* ahead = reinterpret_cast<const char*>(w + kAhead * kMatCols);
      for (int64_t b = 0; b < kRowBytes; b += 64) __builtin_prefetch(ahead + b, 0, kLocality);
    }
    vf wv[kAccVecs];
    for (int j = 0; j < kAccVecs; ++j) wv[j] = Load(w + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * K + k];
      for (int j = 0; j < kAccVecs; ++j) acc[r][j] += s * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kAccVecs; ++j) Store(y + r * y_stride + j * kLanes, acc[r][j]);
}

// Every row of x times tile t. Up to kRows rows: one pass down the tile. More (CFG's second
// stream, best-of-N rows): K in chunks of kChunkBytes, every block of kRows rows per chunk;
// the first block reads the chunk from memory, the others from L1.
template <typename W>
void Tile(const float* x, int64_t M, int64_t K, const W* tiles, int64_t t, float* y,
          int64_t N) {
  const W* tile = tiles + t * K * kMatCols;
  float* out = y + t * kMatCols;
  const int64_t chunk =
      M <= kRows ? K : std::max<int64_t>(1, kChunkBytes / (kMatCols * int64_t(sizeof(W))));
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows)
      TileRows<kRows>(x + m * K, K, k0, k1, tile, out + m * N, N, m == 0);
    const bool first = m == 0;
    switch (M - m) {
      case 1: TileRows<1>(x + m * K, K, k0, k1, tile, out + m * N, N, first); break;
      case 2: TileRows<2>(x + m * K, K, k0, k1, tile, out + m * N, N, first); break;
      case 3: TileRows<3>(x + m * K, K, k0, k1, tile, out + m * N, N, first); break;
      default: break;
    }
  }
}

// Items [0, n) in chunks handed out by a counter, over the calling thread and XLA's intra-op
// threads. The caller takes chunks too, so the work completes even if no helper ever starts;
// a helper that starts late finds nothing left. The counters outlive the call for such
// helpers (shared_ptr); `body` must only be run for claimed chunks (it reads the buffers).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0, chunk = 0, items = 0;
};

template <typename F>
void Drain(Work* work, const F& body) {
  for (int64_t c; (c = work->next.fetch_add(1, std::memory_order_relaxed)) < work->chunks;) {
    body(c * work->chunk, std::min(work->items, (c + 1) * work->chunk));
    work->done.fetch_add(1, std::memory_order_release);
  }
}

template <typename F>
void Parallel(ffi::ThreadPool& pool, int64_t n, F body) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>();
  work->items = n;
  // About 4 chunks a thread, so that a thread slowed by a neighbour does not hold the rest.
  work->chunk = std::max<int64_t>(1, n / (4 * threads));
  work->chunks = (n + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work, body] { Drain(work.get(), body); });
  Drain(work.get(), body);
  while (work->done.load(std::memory_order_acquire) < work->chunks) Relax();
}

template <ffi::DataType WT>
ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> tiles,
                  ffi::ResultBuffer<ffi::F32> y) {
  using W = std::conditional_t<WT == ffi::F32, float, uint16_t>;
  const auto xd = x.dimensions(), td = tiles.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || td.size() != 3 || yd.size() != 2 || td[2] != kMatCols ||
      td[1] != xd[1] || yd[0] != xd[0] || yd[1] != td[0] * kMatCols)
    return ffi::Error::InvalidArgument(
        "cpu_kernels.matvec: expected x[M, K], tiles[T, K, C] and y[M, T * C] with C = "
        "this host's Cm3leonMatVecColumns()");
  const int64_t M = xd[0], K = xd[1], N = td[0] * kMatCols;
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(tiles.untyped_data());
  float* yp = y->typed_data();
  if (M == 0) return ffi::Error::Success();
  Parallel(pool, td[0], [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) Tile(xp, M, K, wp, t, yp, N);
  });
  return ffi::Error::Success();
}

// -- one query per row against the KV cache ----------------------------------------------

inline float Scalar(float x) { return x; }

inline float Scalar(uint16_t bits) {  // bfloat16 bits -> float32
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

template <typename C>
inline float Dot(const float* q, const C* k, int64_t D) {
  vf acc = vf{};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc += Load(q + d) * Load(k + d);
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += acc[i];
  for (; d < D; ++d) s += q[d] * Scalar(k[d]);
  return s;
}

template <typename C>
inline void AddScaled(float* out, float p, const C* v, int64_t D) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) Store(out + d, Load(out + d) + p * Load(v + d));
  for (; d < D; ++d) out[d] += p * Scalar(v[d]);
}

// One (row, kv head): its G queries against the slots the row sees. Slots it does not see
// weigh exactly 0 in the softmax (the masked logit is -0.7 * FLT_MAX, as jax.nn's), so they
// are never read; a row that sees none averages every slot, as softmax over equal logits.
template <typename C>
void AttendOne(const float* q, const C* k, const C* v, const bool* visible, int64_t G,
               int64_t L, int64_t D, float* out, std::vector<float>& scores) {
  int64_t seen = 0;
  for (int64_t l = 0; l < L; ++l) seen += visible[l];
  scores.resize(G * L);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * L;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < L; ++l) {
      if (seen && !visible[l]) continue;
      s[l] = seen ? Dot(q + g * D, k + l * D, D) : 0.f;
      top = std::max(top, s[l]);
    }
    float total = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      if (seen && !visible[l]) continue;
      s[l] = std::exp(s[l] - top);
      total += s[l];
    }
    float* o = out + g * D;
    std::fill(o, o + D, 0.f);
    for (int64_t l = 0; l < L; ++l) {
      if (seen && !visible[l]) continue;
      AddScaled(o, s[l], v + l * D, D);
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

template <ffi::DataType CT>
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<CT> keys,
                     ffi::Buffer<CT> values, ffi::Buffer<ffi::PRED> visible,
                     ffi::ResultBuffer<ffi::F32> out) {
  using C = std::conditional_t<CT == ffi::F32, float, uint16_t>;
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(),
             md = visible.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      !std::equal(qd.begin(), qd.end(), od.begin(), od.end()) || kd[0] != qd[0] ||
      kd[1] != qd[1] || kd[3] != qd[3] || md[0] != qd[0] || md[1] != kd[2])
    return ffi::Error::InvalidArgument(
        "cpu_kernels.one_query_attention: expected q[B, H, G, D], keys and values "
        "[B, H, L, D], visible[B, L] and out[B, H, G, D]");
  const int64_t B = qd[0], H = qd[1], G = qd[2], D = qd[3], L = kd[2];
  const float* qp = q.typed_data();
  const C* kp = reinterpret_cast<const C*>(keys.untyped_data());
  const C* vp = reinterpret_cast<const C*>(values.untyped_data());
  const bool* mp = visible.typed_data();
  float* op = out->typed_data();
  Parallel(pool, B * H, [=](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H;
      AttendOne(qp + i * G * D, kp + i * L * D, vp + i * L * D, mp + b * L, G, L, D,
                op + i * G * D, scores);
    }
  });
  return ffi::Error::Success();
}

// -- causal attention over whole sequences, forward and backward (training, prefill) ----
//
// q [B, T, H, D], k and v [B, S, KVH, D] (float32, jax.nn's layout), segment ids int32 [B, T]
// and [B, S]; query t sees key s when s <= t + offset and their segments are equal. Per
// (row, kv head) task: the head's keys and values copied once into contiguous (and
// transposed) scratch, then blocks of 64 keys against 4 query rows at a time, the scores
// never stored beyond one 4 x 64 tile (FlashAttention's online softmax; the backward pass
// recomputes them from the saved log-sum-exp). A query that sees no key gets the mean of
// all values, as jax.nn's masked softmax gives.

// Scratch arrays aligned to a cache line. glibc returns a large block 16 bytes past a page
// boundary, so each 64-byte vector load from a plain std::vector<float> of a head's keys
// straddled two lines: aligned, one `small` layer's attention forward + backward takes
// 19.7 ms instead of 22.0 (medians, benchmarks/flash_kernel.py), the same sums.
template <typename T>
struct LineAligned {
  typedef T value_type;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
typedef std::vector<float, LineAligned<float>> Floats;

inline vf Exp(vf x) {  // Cephes' expf polynomial on [-ln2/2, ln2/2], times 2^n.
  const vf lo = Splat(-87.3f), hi = Splat(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf big = Splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + big) - big;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline float HMax(vf a) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps(a);
#else
  float m = a[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, a[i]);
  return m;
#endif
}

inline float HSum(vf a) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(a);
#else
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += a[i];
  return s;
#endif
}

// The lane-wise sum of v[0:N] (N a power of two) as a balanced tree: ((v0 + v1) + (v2 + v3))
// for a 64-float row of 16-lane vectors, as the kernels summed it before the width varied.
template <int N>
inline vf TreeSum(const vf* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return TreeSum<N / 2>(v) + TreeSum<N / 2>(v + N / 2);
  }
}

template <int N>
inline vf TreeMax(const vf* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    const vf a = TreeMax<N / 2>(v), b = TreeMax<N / 2>(v + N / 2);
    return a > b ? a : b;
  }
}

constexpr int64_t kKeys = kTile;  // keys per block: kTileVecs vectors

// V vectors of dst (kLanes V floats from column d) += sum_i coef[i] * src[i][d:...], summed
// as two interleaved chains of V accumulators each: one chain of dependent FMAs would wait
// on each one's latency (4 cycles on AVX-512 hosts) instead of issuing 2 a cycle.
template <int V>
inline void AccumBlock(float* dst, const float* coef, const float* const* src, int64_t n,
                       int64_t d) {
  vf even[V], odd[V];
  for (int c = 0; c < V; ++c) {
    even[c] = Load(dst + kLanes * c);
    odd[c] = vf{};
  }
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const float c0 = coef[i], c1 = coef[i + 1];
    const float *s0 = src[i] + d, *s1 = src[i + 1] + d;
    for (int c = 0; c < V; ++c) {
      even[c] += c0 * Load(s0 + kLanes * c);
      odd[c] += c1 * Load(s1 + kLanes * c);
    }
  }
  if (i < n)
    for (int c = 0; c < V; ++c) even[c] += coef[i] * Load(src[i] + d + kLanes * c);
  for (int c = 0; c < V; ++c) Store(dst + kLanes * c, even[c] + odd[c]);
}

// dst[d:D] += sum_i coef[i] * src[i][d:D], in registers V vectors at a time, then fewer.
template <int V = kAccVecs>
inline void AccumRows(float* dst, const float* coef, const float* const* src, int64_t n,
                      int64_t D, int64_t d = 0) {
  for (; d + V * kLanes <= D; d += V * kLanes) AccumBlock<V>(dst + d, coef, src, n, d);
  if constexpr (V > 1) {
    AccumRows<V / 2>(dst, coef, src, n, D, d);
  } else {
    for (; d < D; ++d)
      for (int64_t i = 0; i < n; ++i) dst[d] += coef[i] * src[i][d];
  }
}

// Four such sums at once, dst[r] += sum_i coef[r][i * cs] * src[i] for r < 4: each src row
// is read once for all four, into 4 V independent accumulators. The coefficients' stride
// `cs` lets the backward read a column of a row-major tile (its transpose) in place.
template <int V>
inline void Accum4Block(float* const dst[4], const float* const coef[4], int64_t cs,
                        const float* const* src, int64_t n, int64_t d) {
  vf sum[4][V];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < V; ++c) sum[r][c] = Load(dst[r] + d + kLanes * c);
  for (int64_t i = 0; i < n; ++i) {
    vf x[V];
    for (int c = 0; c < V; ++c) x[c] = Load(src[i] + d + kLanes * c);
    for (int r = 0; r < 4; ++r) {
      const float w = coef[r][i * cs];
      for (int c = 0; c < V; ++c) sum[r][c] += w * x[c];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < V; ++c) Store(dst[r] + d + kLanes * c, sum[r][c]);
}

template <int V = kAccVecs>
inline void Accum4(float* const dst[4], const float* const coef[4], int64_t cs,
                   const float* const* src, int64_t n, int64_t D, int64_t d = 0) {
  for (; d + V * kLanes <= D; d += V * kLanes) Accum4Block<V>(dst, coef, cs, src, n, d);
  if constexpr (V > 1) {
    Accum4<V / 2>(dst, coef, cs, src, n, D, d);
  } else {
    for (; d < D; ++d)
      for (int r = 0; r < 4; ++r)
        for (int64_t i = 0; i < n; ++i) dst[r][d] += coef[r][i * cs] * src[i][d];
  }
}

constexpr float kBlind = -std::numeric_limits<float>::infinity();  // LSE of a row that sees none

struct Shape {
  int64_t B, T, S, H, KVH, D, offset;
  int64_t G() const { return H / KVH; }
};

// The row stride of a head's transposed keys or values: S rounded up to a key block.
inline int64_t ColsStride(int64_t S) { return (S + kKeys - 1) / kKeys * kKeys; }

// One head's keys (or values) gathered from [B, S, KVH, D]: as rows [S, D] (read one key
// at a time) and transposed, cols [D, ColsStride(S)], zero-padded (read as tiles).
struct HeadScratch {
  Floats rows, cols;
  enum Layout { kRowsOnly = 1, kColsOnly = 2, kBoth = 3 };
  void Load(const float* src, const Shape& sh, int64_t b, int64_t h, Layout layout) {
    const int64_t Sp = ColsStride(sh.S);
    const auto row = [&](int64_t s) { return src + ((b * sh.S + s) * sh.KVH + h) * sh.D; };
    if (layout & kRowsOnly) {
      rows.resize(sh.S * sh.D);
      for (int64_t s = 0; s < sh.S; ++s)
        std::memcpy(rows.data() + s * sh.D, row(s), sh.D * sizeof(float));
    }
    if (layout & kColsOnly) {
      cols.assign(sh.D * Sp, 0.f);
      // 16 keys at a time, so that each write fills a line of `cols` (a key at a time
      // strides a whole column per store: a tenth of the backward pass went there).
      for (int64_t s0 = 0; s0 < sh.S; s0 += 16) {
        const int64_t n = std::min<int64_t>(16, sh.S - s0);
        const float* r[16];
        for (int64_t i = 0; i < n; ++i) r[i] = row(s0 + i);
        for (int64_t d = 0; d < sh.D; ++d)
          for (int64_t i = 0; i < n; ++i) cols[d * Sp + s0 + i] = r[i][d];
      }
    }
  }
};

// The 4 x 64 tile rows . cols[:, j0:j0+64] for 4 query rows a[r] (each D long), kAccVecs
// vectors of columns a pass over d.
inline void Tile4(const float* const a[4], const float* cols, int64_t Sp, int64_t j0,
                  int64_t D, vf out[4][kTileVecs]) {
  for (int c0 = 0; c0 < kTileVecs; c0 += kAccVecs) {
    vf acc[4][kAccVecs];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < kAccVecs; ++c) acc[r][c] = vf{};
    for (int64_t d = 0; d < D; ++d) {
      const float* k = cols + d * Sp + j0 + c0 * kLanes;
      vf kv[kAccVecs];
      for (int c = 0; c < kAccVecs; ++c) kv[c] = Load(k + c * kLanes);
      for (int r = 0; r < 4; ++r) {
        const float x = a[r][d];
        for (int c = 0; c < kAccVecs; ++c) acc[r][c] += x * kv[c];
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < kAccVecs; ++c) out[r][c0 + c] = acc[r][c];
  }
}

// Keys j0..j0+63: their indices and segments (padding past S: never visible), for the
// masks of every query row against the block.
struct KeyBlock {
  vi idx[kTileVecs], seg[kTileVecs];
  KeyBlock(const Shape& sh, const int32_t* kseg, int64_t j0) {
    for (int c = 0; c < kTileVecs; ++c)
      for (int i = 0; i < kLanes; ++i) {
        const int64_t s = j0 + kLanes * c + i;
        idx[c][i] = s < sh.S ? int32_t(s) : std::numeric_limits<int32_t>::max();
        seg[c][i] = s < sh.S ? kseg[s] : std::numeric_limits<int32_t>::min();
      }
  }
  // Which keys query t (segment qseg) sees: all-ones lanes.
  void Visible(const Shape& sh, int32_t qseg, int64_t t, vi out[kTileVecs]) const {
    const int32_t last = int32_t(t + sh.offset);
    for (int c = 0; c < kTileVecs; ++c) out[c] = (idx[c] <= last) & (seg[c] == qseg);
  }
};

// Forward for one (row b, kv head h): every query of the head's group.
void FlashForwardTask(const float* q, const float* k, const float* v, const int32_t* qseg,
                      const int32_t* kseg, const Shape& sh, int64_t b, int64_t h, float* out,
                      float* lse) {
  thread_local HeadScratch K, V;
  K.Load(k, sh, b, h, HeadScratch::kColsOnly);
  V.Load(v, sh, b, h, HeadScratch::kRowsOnly);
  const int64_t D = sh.D, Sp = ColsStride(sh.S);
  const float scale = 1.f / std::sqrt(float(D));
  const int32_t* ks = kseg + b * sh.S;
  std::vector<KeyBlock> blocks;  // every key block's indices and segments, built once
  for (int64_t j0 = 0; j0 < sh.S; j0 += kKeys) blocks.emplace_back(sh, ks, j0);
  std::vector<float> mean;  // of all values: the output of a query that sees no key
  thread_local Floats acc;
  acc.resize(4 * D);
  for (int64_t g = 0; g < sh.G(); ++g) {
    const int64_t head = h * sh.G() + g;
    for (int64_t t0 = 0; t0 < sh.T; t0 += 4) {
      const int64_t rows = std::min<int64_t>(4, sh.T - t0);
      const float* a[4];
      float m[4], l[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t t = t0 + std::min<int64_t>(r, rows - 1);
        a[r] = q + ((b * sh.T + t) * sh.H + head) * D;
        m[r] = kBlind;
        l[r] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float pr[4][kKeys];  // each key block's P, 0 for a row that has seen nothing or past T
      float* const sums[4] = {acc.data(), acc.data() + D, acc.data() + 2 * D, acc.data() + 3 * D};
      const float* const weights[4] = {pr[0], pr[1], pr[2], pr[3]};
      const int64_t last = std::min(sh.S, t0 + rows - 1 + sh.offset + 1);  // keys seen
      for (int64_t j0 = 0; j0 < last; j0 += kKeys) {
        vf st[4][kTileVecs];
        Tile4(a, K.cols.data(), Sp, j0, D, st);
        const KeyBlock& keys = blocks[j0 / kKeys];
        std::memset(pr, 0, sizeof(pr));
        for (int r = 0; r < rows; ++r) {
          const int64_t t = t0 + r;
          vi vis[kTileVecs];
          keys.Visible(sh, qseg[b * sh.T + t], t, vis);
          vf sc[kTileVecs];
          for (int c = 0; c < kTileVecs; ++c) sc[c] = vis[c] ? st[r][c] * scale : Splat(kBlind);
          const float top = std::max(m[r], HMax(TreeMax<kTileVecs>(sc)));
          if (top == kBlind) continue;  // nothing seen yet
          float* o = acc.data() + r * D;
          if (top != m[r]) {  // rescale what was summed under the old maximum
            const float fix = m[r] == kBlind ? 0.f : std::exp(m[r] - top);
            for (int64_t d = 0; d < D; ++d) o[d] *= fix;
            l[r] *= fix;
            m[r] = top;
          }
          vf total = vf{};
          for (int c = 0; c < kTileVecs; ++c) {
            vf p = Exp(sc[c] - top);
            p = vis[c] ? p : vf{};
            total += p;
            Store(pr[r] + kLanes * c, p);
          }
          l[r] += HSum(total);
        }
        const float* vr[kKeys];
        const int64_t n = std::min(kKeys, sh.S - j0);
        for (int64_t j = 0; j < n; ++j) vr[j] = V.rows.data() + (j0 + j) * D;
        Accum4(sums, weights, 1, vr, n, D);
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t t = t0 + r;
        float* dst = out + ((b * sh.T + t) * sh.H + head) * D;
        const float* o = acc.data() + r * D;
        float* ls = lse + (b * sh.H + head) * sh.T + t;
        if (m[r] == kBlind) {
          if (mean.empty()) {
            mean.assign(D, 0.f);
            for (int64_t s = 0; s < sh.S; ++s)
              for (int64_t d = 0; d < D; ++d) mean[d] += V.rows[s * D + d];
            for (int64_t d = 0; d < D; ++d) mean[d] /= float(sh.S);
          }
          std::memcpy(dst, mean.data(), D * sizeof(float));
          *ls = kBlind;
        } else {
          const float inv = 1.f / l[r];
          for (int64_t d = 0; d < D; ++d) dst[d] = o[d] * inv;
          *ls = m[r] + std::log(l[r]);
        }
      }
    }
  }
}

// Backward for one (row b, kv head h): dq of the group's queries, dk and dv of the head.
// Blocks of 64 query rows against each key block, so that a key's dk and dv rows are read
// and written once per 64 queries (the scores of 4 rows at a time, as in the forward;
// 64 rows against 16: one small layer's backward about 3 ms of 18 faster, the same sums).
constexpr int64_t kQueries = 64;

void FlashBackwardTask(const float* q, const float* k, const float* v, const int32_t* qseg,
                       const int32_t* kseg, const float* out, const float* lse,
                       const float* dout, const Shape& sh, int64_t b, int64_t h, float* dq,
                       float* dk, float* dv) {
  thread_local HeadScratch K, V;
  K.Load(k, sh, b, h, HeadScratch::kBoth);
  V.Load(v, sh, b, h, HeadScratch::kColsOnly);
  const int64_t D = sh.D, Sp = ColsStride(sh.S);
  const float scale = 1.f / std::sqrt(float(D));
  const int32_t* ks = kseg + b * sh.S;
  thread_local Floats gk, gv;
  gk.assign(sh.S * D, 0.f);
  gv.assign(sh.S * D, 0.f);
  for (int64_t g = 0; g < sh.G(); ++g) {
    const int64_t head = h * sh.G() + g;
    for (int64_t t0 = 0; t0 < sh.T; t0 += kQueries) {
      const int64_t rows = std::min(kQueries, sh.T - t0);
      const float *a[kQueries], *da[kQueries];
      float ls[kQueries], delta[kQueries], *gq[kQueries];
      for (int64_t r = 0; r < kQueries; ++r) {  // rows past T repeat the last one, unused
        const int64_t t = t0 + std::min(r, rows - 1);
        const int64_t at = ((b * sh.T + t) * sh.H + head) * D;
        a[r] = q + at;
        da[r] = dout + at;
        ls[r] = lse[(b * sh.H + head) * sh.T + t];
        float dsum = 0.f;
        for (int64_t d = 0; d < D; ++d) dsum += dout[at + d] * out[at + d];
        delta[r] = dsum;
        gq[r] = dq + at;
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::fill(gq[r], gq[r] + D, 0.f);
        if (ls[r] == kBlind)  // the mean of the values: each value gets dout / S
          for (int64_t s = 0; s < sh.S; ++s) AddScaled(gv.data() + s * D, 1.f / sh.S, da[r], D);
      }
      const int64_t last = std::min(sh.S, t0 + rows - 1 + sh.offset + 1);
      for (int64_t j0 = 0; j0 < last; j0 += kKeys) {
        const KeyBlock keys(sh, ks, j0);
        float pr[kQueries][kKeys] = {}, dsr[kQueries][kKeys] = {};  // P and dS, 0 if unseen
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
          vf st[4][kTileVecs], dp[4][kTileVecs];
          Tile4(a + r0, K.cols.data(), Sp, j0, D, st);
          Tile4(da + r0, V.cols.data(), Sp, j0, D, dp);
          for (int64_t r = r0; r < std::min(r0 + 4, rows); ++r) {
            if (ls[r] == kBlind) continue;
            vi vis[kTileVecs];
            keys.Visible(sh, qseg[b * sh.T + t0 + r], t0 + r, vis);
            for (int c = 0; c < kTileVecs; ++c) {
              vf p = Exp(st[r - r0][c] * scale - ls[r]);
              p = vis[c] ? p : vf{};
              const vf ds = p * (dp[r - r0][c] - delta[r]) * scale;
              Store(pr[r] + kLanes * c, p);
              Store(dsr[r] + kLanes * c, ds);
            }
          }
        }
        // dv and dk of 4 keys at a time (P and dS read down their columns: the transposes),
        // then dq of 4 rows at a time.
        const int64_t n = std::min(kKeys, sh.S - j0);
        const float* kr[kKeys];
        for (int64_t j = 0; j < n; ++j) kr[j] = K.rows.data() + (j0 + j) * D;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
          float* const gvs[4] = {&gv[(j0 + j) * D], &gv[(j0 + j + 1) * D], &gv[(j0 + j + 2) * D],
                                 &gv[(j0 + j + 3) * D]};
          float* const gks[4] = {&gk[(j0 + j) * D], &gk[(j0 + j + 1) * D], &gk[(j0 + j + 2) * D],
                                 &gk[(j0 + j + 3) * D]};
          const float* const ps[4] = {&pr[0][j], &pr[0][j + 1], &pr[0][j + 2], &pr[0][j + 3]};
          const float* const ds[4] = {&dsr[0][j], &dsr[0][j + 1], &dsr[0][j + 2], &dsr[0][j + 3]};
          Accum4(gvs, ps, kKeys, da, rows, D);
          Accum4(gks, ds, kKeys, a, rows, D);
        }
        for (; j < n; ++j) {
          float pcol[kQueries], dcol[kQueries];
          for (int64_t r = 0; r < rows; ++r) {
            pcol[r] = pr[r][j];
            dcol[r] = dsr[r][j];
          }
          AccumRows(&gv[(j0 + j) * D], pcol, da, rows, D);
          AccumRows(&gk[(j0 + j) * D], dcol, a, rows, D);
        }
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
          float* const gqs[4] = {gq[r], gq[r + 1], gq[r + 2], gq[r + 3]};
          const float* const ds[4] = {dsr[r], dsr[r + 1], dsr[r + 2], dsr[r + 3]};
          Accum4(gqs, ds, 1, kr, n, D);
        }
        for (; r < rows; ++r) AccumRows(gq[r], dsr[r], kr, n, D);
      }
    }
  }
  for (int64_t s = 0; s < sh.S; ++s) {
    const int64_t at = ((b * sh.S + s) * sh.KVH + h) * D;
    std::memcpy(dk + at, gk.data() + s * D, D * sizeof(float));
    std::memcpy(dv + at, gv.data() + s * D, D * sizeof(float));
  }
}

ffi::Error CheckFlash(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                      const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S32>& qseg,
                      const ffi::Buffer<ffi::S32>& kseg, int64_t offset, Shape* sh) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             qs = qseg.dimensions(), kvs = kseg.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) ||
      kd[0] != qd[0] || kd[3] != qd[3] || kd[2] == 0 || qd[2] % kd[2] != 0 || qs.size() != 2 ||
      kvs.size() != 2 || qs[0] != qd[0] || qs[1] != qd[1] || kvs[0] != qd[0] || kvs[1] != kd[1])
    return ffi::Error::InvalidArgument(
        "cpu_kernels.flash_attention: expected q[B, T, H, D], k and v [B, S, KVH, D] with H a "
        "multiple of KVH, segment ids [B, T] and [B, S]");
  *sh = Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], offset};
  return ffi::Error::Success();
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg,
                        ffi::Buffer<ffi::S32> kseg, int64_t offset,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (auto e = CheckFlash(q, k, v, qseg, kseg, offset, &sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *qs = qseg.typed_data(), *ks = kseg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  Parallel(pool, sh.B * sh.KVH, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      FlashForwardTask(qp, kp, vp, qs, ks, sh, i / sh.KVH, i % sh.KVH, op, lp);
  });
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qseg,
                         ffi::Buffer<ffi::S32> kseg, ffi::Buffer<ffi::F32> out,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int64_t offset,
                         ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                         ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (auto e = CheckFlash(q, k, v, qseg, kseg, offset, &sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  const int32_t *qs = qseg.typed_data(), *ks = kseg.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  Parallel(pool, sh.B * sh.KVH, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      FlashBackwardTask(qp, kp, vp, qs, ks, op, lp, gp, sh, i / sh.KVH, i % sh.KVH, dqp, dkp,
                        dvp);
  });
  return ffi::Error::Success();
}

// -- the loss's softmax and its gradient, a chunk of tokens at a time (training) ---------
//
// logits [N, V] -> d_logits [N, V] (may alias the logits), log_z [N], target_logit [N]:
//
//   log_z = logsumexp(logits[n]),   target_logit = logits[n, t] (0 if t is not in [0, V)),
//   d_logits[n] = softmax(logits[n]) * g[n] * (1 + 2 z_loss log_z) - g[n] * onehot(t),
//
// the gradient of sum_n g[n] (log_z - target_logit + z_loss log_z^2). A row (V floats) is
// read once from memory for its maximum; its exponentials are written to the output row
// and scaled there while the row is still in cache. XLA:CPU's fusions of the same
// expression made five passes over the [N, V] array (benchmarks/RESULTS_train.md).
void SoftmaxGradRow(const float* logits, int32_t target, float g, float z_loss, int64_t V,
                    float* d, float* log_z, float* target_logit) {
  int64_t i = 0;
  vf m[kTileVecs];
  for (int c = 0; c < kTileVecs; ++c) m[c] = Splat(-std::numeric_limits<float>::infinity());
  for (; i + kTile <= V; i += kTile)
    for (int c = 0; c < kTileVecs; ++c) {
      const vf x = Load(logits + i + kLanes * c);
      m[c] = x > m[c] ? x : m[c];
    }
  float top = HMax(TreeMax<kTileVecs>(m));
  for (; i < V; ++i) top = std::max(top, logits[i]);
  // Read before the output (which may be this very row) is written.
  *target_logit = target >= 0 && target < V ? logits[target] : 0.f;
  vf sums[kTileVecs] = {};
  i = 0;
  for (; i + kTile <= V; i += kTile)
    for (int c = 0; c < kTileVecs; ++c) {
      const vf e = Exp(Load(logits + i + kLanes * c) - top);
      sums[c] += e;
      Store(d + i + kLanes * c, e);
    }
  float total = HSum(TreeSum<kTileVecs>(sums));
  for (; i < V; ++i) {
    d[i] = std::exp(logits[i] - top);
    total += d[i];
  }
  const float lz = top + std::log(total);
  *log_z = lz;
  const float scale = g * (1.f + 2.f * z_loss * lz) / total;
  i = 0;
  for (; i + kLanes <= V; i += kLanes) Store(d + i, Load(d + i) * scale);
  for (; i < V; ++i) d[i] *= scale;
  if (target >= 0 && target < V) d[target] -= g;
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                       ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> g, float z_loss,
                       ffi::ResultBuffer<ffi::F32> d_logits, ffi::ResultBuffer<ffi::F32> log_z,
                       ffi::ResultBuffer<ffi::F32> target_logit) {
  const auto ld = logits.dimensions(), td = targets.dimensions(), gd = g.dimensions(),
             dd = d_logits->dimensions(), zd = log_z->dimensions(),
             pd = target_logit->dimensions();
  if (ld.size() != 2 || td.size() != 1 || gd.size() != 1 || td[0] != ld[0] ||
      gd[0] != ld[0] || !std::equal(ld.begin(), ld.end(), dd.begin(), dd.end()) ||
      zd.size() != 1 || zd[0] != ld[0] || pd.size() != 1 || pd[0] != ld[0])
    return ffi::Error::InvalidArgument(
        "cpu_kernels.softmax_grad: expected logits[N, V], targets[N], g[N] and outputs "
        "d_logits[N, V], log_z[N], target_logit[N]");
  const int64_t N = ld[0], V = ld[1];
  const float* lp = logits.typed_data();
  const int32_t* tp = targets.typed_data();
  const float* gp = g.typed_data();
  float *dp = d_logits->typed_data(), *zp = log_z->typed_data(), *pp = target_logit->typed_data();
  if (V == 0) return ffi::Error::InvalidArgument("cpu_kernels.softmax_grad: V = 0");
  Parallel(pool, N, [=](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      SoftmaxGradRow(lp + n * V, tp[n], gp[n], z_loss, V, dp + n * V, zp + n, pp + n);
  });
  return ffi::Error::Success();
}

// -- top-p's threshold --------------------------------------------------------------------
//
// processors.nucleus_threshold for one row: the smallest int32 key k such that the
// probabilities of the keys above k sum to less than p, by 32 halvings of [min - 1, max]
// in int32 arithmetic (wrapping as XLA's), each one masked sum over the row. The sums run
// in lanes and then across them: another order than XLA's reduction, so a threshold can
// differ from the XLA path's where a sum lies within rounding of p.
inline float MassAbove(const int32_t* keys, const float* probs, int64_t V, int32_t k) {
  const vi kv = vi{} + k;
  vf a0 = vf{}, a1 = vf{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= V; i += 2 * kLanes) {
    vi k0, k1;
    std::memcpy(&k0, keys + i, sizeof(k0));
    std::memcpy(&k1, keys + i + kLanes, sizeof(k1));
    a0 += k0 > kv ? Load(probs + i) : vf{};
    a1 += k1 > kv ? Load(probs + i + kLanes) : vf{};
  }
  float total = HSum(a0 + a1);
  for (; i < V; ++i) total += keys[i] > k ? probs[i] : 0.f;
  return total;
}

int32_t NucleusThresholdRow(const int32_t* keys, const float* probs, int64_t V, float p) {
  int32_t low = keys[0], high = keys[0];
  for (int64_t i = 1; i < V; ++i) {
    low = std::min(low, keys[i]);
    high = std::max(high, keys[i]);
  }
  int32_t lo = int32_t(uint32_t(low) - 1u), hi = high;  // above lo: >= p; above hi: < p
  for (int step = 0; step < 32; ++step) {
    const int32_t mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1);  // floor((lo + hi) / 2)
    if (MassAbove(keys, probs, V, mid) < p)
      hi = mid;
    else
      lo = mid;
  }
  return hi;
}

ffi::Error NucleusThreshold(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> keys,
                            ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> p,
                            ffi::ResultBuffer<ffi::S32> out) {
  const auto kd = keys.dimensions(), pd = probs.dimensions(), qd = p.dimensions(),
             od = out->dimensions();
  if (kd.size() != 2 || !std::equal(kd.begin(), kd.end(), pd.begin(), pd.end()) ||
      qd.size() != 1 || qd[0] != kd[0] || od.size() != 1 || od[0] != kd[0] || kd[1] == 0)
    return ffi::Error::InvalidArgument(
        "cpu_kernels.nucleus_threshold: expected keys and probs [R, V] with V > 0, p[R] "
        "and out[R]");
  const int64_t V = kd[1];
  const int32_t* kp = keys.typed_data();
  const float* pp = probs.typed_data();
  const float* qp = p.typed_data();
  int32_t* op = out->typed_data();
  Parallel(pool, kd[0], [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      op[r] = NucleusThresholdRow(kp + r * V, pp + r * V, V, qp[r]);
  });
  return ffi::Error::Success();
}

}  // namespace

// The tiles' width Cm3leonMatVec* reads on this host (cpu_kernels.pack lays them out so).
extern "C" int64_t Cm3leonMatVecColumns() { return kMatCols; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonMatVecF32, MatVec<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonMatVecBF16, MatVec<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonAttentionF32, Attention<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonAttentionBF16, Attention<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonFlashForward, FlashForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("offset")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonFlashBackward, FlashBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("offset")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonSoftmaxGrad, SoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("z_loss")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Cm3leonNucleusThreshold, NucleusThreshold,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
