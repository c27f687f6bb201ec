// A few rows times a matrix on CPU, at the rate memory streams the matrix.
//
//   y[M, T * 64] = x[M, K] @ W[K, T * 64],   W stored as tiles P[T, K, 64] (float32 or
//   bfloat16 bits), y and x float32.
//
// One generated token reads every weight once for a handful of rows (the batch), so a decode
// step is bound by how fast the weights stream from memory. XLA:CPU's dot reads a [K, N]
// matrix for 4 rows at about half the host's streaming rate (benchmarks/RESULTS_decode.md);
// this kernel reads each 64-column tile as one contiguous block, prefetched ahead, with the
// tile's 4 x 64 partial sums in registers, and splits the tiles over XLA's intra-op threads.
// Built by cpu_matvec.py with the host compiler (GCC vector extensions: AVX-512, AVX2 or
// NEON, whatever -march=native offers).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;   // columns per tile: 4 vectors of 16 floats
constexpr int64_t kAhead = 32;  // prefetch distance, in rows of a tile (8 KiB of float32)
constexpr int64_t kRows = 4;    // rows of x per pass over a tile

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t u16 __attribute__((vector_size(64)));

inline void Relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

inline v16 Load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 Load(const uint16_t* p) {  // bfloat16 bits -> float32: the high half of the word
  h16 h;
  std::memcpy(&h, p, sizeof(h));
  u16 u = __builtin_convertvector(h, u16) << 16;
  v16 v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// R rows of x (row stride K) times one tile [K, 64]; writes the R rows' 64 columns of y.
template <int R, typename W>
inline void TileRows(const float* x, int64_t K, const W* tile, float* y, int64_t y_stride) {
  v16 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const W* w = tile + k * kTile;
    const char* ahead = reinterpret_cast<const char*>(w + kAhead * kTile);
    for (int64_t b = 0; b < kTile * int64_t(sizeof(W)); b += 64)
      __builtin_prefetch(ahead + b, 0, 3);
    const v16 w0 = Load(w), w1 = Load(w + 16), w2 = Load(w + 32), w3 = Load(w + 48);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * K + k];
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
      acc[r][2] += s * w2;
      acc[r][3] += s * w3;
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * y_stride, acc[r], sizeof(acc[r]));
}

// Every row of x times tile t. The first row block reads the tile from memory; the others
// find it in cache (a tile is K * 256 bytes).
template <typename W>
void Tile(const float* x, int64_t M, int64_t K, const W* tiles, int64_t t, float* y,
          int64_t N) {
  const W* tile = tiles + t * K * kTile;
  float* out = y + t * kTile;
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) TileRows<kRows>(x + m * K, K, tile, out + m * N, N);
  switch (M - m) {
    case 1: TileRows<1>(x + m * K, K, tile, out + m * N, N); break;
    case 2: TileRows<2>(x + m * K, K, tile, out + m * N, N); break;
    case 3: TileRows<3>(x + m * K, K, tile, out + m * N, N); break;
    default: break;
  }
}

// Chunks of tiles handed out by a counter: the calling thread takes chunks too, so the
// product completes even if no helper thread ever starts; helpers that start late find
// nothing left. The state outlives the call for them (shared_ptr).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0, chunk = 0, tiles = 0;
};

template <typename W>
void Drain(Work* work, const float* x, int64_t M, int64_t K, const W* tiles, float* y,
           int64_t N) {
  for (int64_t c; (c = work->next.fetch_add(1, std::memory_order_relaxed)) < work->chunks;) {
    const int64_t end = std::min(work->tiles, (c + 1) * work->chunk);
    for (int64_t t = c * work->chunk; t < end; ++t) Tile(x, M, K, tiles, t, y, N);
    work->done.fetch_add(1, std::memory_order_release);
  }
}

template <ffi::DataType WT>
ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WT> tiles,
                  ffi::ResultBuffer<ffi::F32> y) {
  using W = std::conditional_t<WT == ffi::F32, float, uint16_t>;
  const auto xd = x.dimensions(), td = tiles.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || td.size() != 3 || yd.size() != 2 || td[2] != kTile ||
      td[1] != xd[1] || yd[0] != xd[0] || yd[1] != td[0] * kTile)
    return ffi::Error::InvalidArgument(
        "cpu_matvec: expected x[M, K], tiles[T, K, 64] and y[M, T * 64]");
  const int64_t M = xd[0], K = xd[1], T = td[0], N = T * kTile;
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(tiles.untyped_data());
  float* yp = y->typed_data();
  if (M == 0 || T == 0) return ffi::Error::Success();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>();
  work->tiles = T;
  // About 4 chunks a thread, so that a thread slowed by a neighbour does not hold the rest.
  work->chunk = std::max<int64_t>(1, T / (4 * threads));
  work->chunks = (T + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([work, xp, M, K, wp, yp, N] { Drain(work.get(), xp, M, K, wp, yp, N); });
  Drain(work.get(), xp, M, K, wp, yp, N);
  while (work->done.load(std::memory_order_acquire) < work->chunks) Relax();
  return ffi::Error::Success();
}

}  // namespace

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
