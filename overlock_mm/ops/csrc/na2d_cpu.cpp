// Neighbourhood aggregation (ContMix "AV", NATTEN 0.17 clamped windows) for CPUs.
//
// Plain C++17 without torch headers, so it compiles in seconds and is called through ctypes
// (see ../na2d_cpu.py for the build, the cache and the autograd wiring).  Layouts (contiguous):
//
//   attn  [BG][T = k*k][H][W]     value / out / grad_out  [BG][D][H][W]
//
// For kernel k, r = k / 2 and an axis of length L >= k, position i reads the window that starts at
// s(i) = clamp(i - r, 0, L - k).  Tap t = a * k + b of pixel (i, j) reads value at
// (s(i) + a, s(j) + b).
//
// Vectorisation is along W ("lanes" = one SIMD register of T), in tiles of `lanes` pixels.
// On an interior tile (every pixel r <= j < W - r, so s(j) = j - r) each tap reads consecutive
// value columns: one unaligned vector load per FMA, with the per-tap attention vector loaded
// once per channel chunk.  On a border tile the window start is clamped for some lanes, but
// s(j0 + l) - s(j0) is still a fixed per-tile index vector, so the same load followed by one
// permute serves all L pixels (no per-pixel path; maps narrower than a vector are one partial
// tile).  Value is read from a copy whose rows are padded by one vector, so no load leaves it.
//
// grad_value is computed as a *gather* over the inverse neighbourhood (no scatter, no atomics):
// the rows i whose window contains source row p form a contiguous range, and along W every
// interior pixel j is its own window centre, so with zero padding outside the interior columns
// (grad_out in `gpad`, attention in a per-row scratch) the interior contribution to a tile of
// source columns q is a plain shifted sum.  The r border pixels on each side share one window
// (starting at 0 or W - k) and are added separately.
//
// Work is split over (group, row) tasks handed out by an atomic counter to std::threads, so a
// descheduled thread on a shared machine does not stall the others at a barrier.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMaxChunkF = 16;  // channels accumulated in registers at once (32 zmm registers)
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMaxChunkF = 8;   // 16 ymm registers
#else
constexpr int kVecBytes = 16;
constexpr int kMaxChunkF = 8;
#endif

// GCC/Clang vector extensions: portable SIMD without intrinsics (the compiler maps them onto
// AVX-512, AVX2, SSE or NEON as -march allows).
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int lanes() { return kVecBytes / (int)sizeof(T); }

template <typename T>
inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void storeu(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof(v)); }

// Integer vector of the same lane count (permute indices).
template <typename T>
struct IVecOf {
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  typedef I type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using IVec = typename IVecOf<T>::type;

// y[l] = x[idx[l]]: one vpermps / vpermpd on AVX-512 (GCC's variable shuffle; other compilers
// get the lane loop).
template <typename T>
inline Vec<T> permute(const Vec<T>& x, const IVec<T>& idx) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(x, idx);
#else
  Vec<T> y;
  for (int l = 0; l < lanes<T>(); ++l) y[l] = x[idx[l]];
  return y;
#endif
}

// A value vector feeds two FMAs (two output rows). Left alone, GCC folds the load into both
// FMAs, i.e. loads it twice -- and these loads, unaligned, are what the tile loops are bound by.
// The empty asm pins the vector in a register (no code emitted).
template <typename T>
inline Vec<T> in_register(Vec<T> v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(v));
#endif
  return v;
}

// First n (< lanes) elements only, the rest zero / untouched: rows shorter than a vector.
template <typename T>
inline Vec<T> loadn(const T* p, int n) {
  Vec<T> v{};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}
template <typename T>
inline void storen(T* p, const Vec<T>& v, int n) { std::memcpy(p, &v, sizeof(T) * n); }

inline int64_t window_start(int64_t i, int64_t len, int k) {
  int64_t s = i - k / 2;
  if (s > len - k) s = len - k;
  if (s < 0) s = 0;
  return s;
}

template <typename F>
void parallel_for(int64_t n, int nthreads, const F& fn) {
  if (n <= 0) return;
  int nt = (int)std::min<int64_t>(std::max(nthreads, 1), n);
  if (nt == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&](int tid) {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      fn(i, tid);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

struct Geo {
  int64_t BG, D, H, W;
  int k, r;
  int64_t HW() const { return H * W; }
};

// Rows are processed in pairs (i, i + 1): consecutive rows read mostly the same value rows (their
// windows start at s and s or s + 1), so every value vector loaded feeds two FMAs.  MASK says
// which of the two rows use the current source row (bit 0: row i, bit 1: row i + 1).
constexpr int kRowsPerTask = 8;

// ------------------------------------------------------------------------------------ forward
// out[c][i][j] = sum_{a,b} attn[a*k+b][i][j] * value[c][s(i)+a][s(j)+b] for a tile of L consecutive
// pixels j = j0 + l.  Within a tile, s(j0 + l) = s(j0) + idx[l] with idx non-decreasing in 0..L-1:
// the identity on interior tiles, flat where the window is clamped at a border.  So for every tap
// one vector load of value (from the row-padded copy VP, [D][H][WP], WP = W + L: loads never leave
// the buffer) at column s(j0) + b, permuted by idx on border tiles, feeds L pixels -- borders cost
// one permute per load instead of a per-pixel path.
//   MODE 0: interior tile; 1: border tile (permute); 2: narrow map, W < L (permute, and the
//   attention / output rows are W long: partial loads and stores).
// A -> attn[0][i][j0], VR -> VP[c0][0][s(j0)], O -> out[c0][i][j0]; PF -> attn of the tile
// computed next (software prefetch: the k*k taps of a tile are k*k separate streams, more than
// the hardware prefetchers track), or null.  Rows are processed in pairs (see kRowsPerTask).
template <typename T, int DC>
struct FwdChunk {
  template <int MASK, int MODE>
  static inline void taps(Vec<T> (&acc)[2][DC], const T* __restrict a0, const T* __restrict a1,
                          const T* __restrict vr, const T* pf0, const T* pf1, int64_t HW,
                          int64_t HWP, int k, const IVec<T>& idx, int n) {
    for (int b = 0; b < k; ++b) {
      Vec<T> x0{}, x1{};
      if (MASK & 1) x0 = MODE == 2 ? loadn(a0 + b * HW, n) : loadu(a0 + b * HW);
      if (MASK & 2) x1 = MODE == 2 ? loadn(a1 + b * HW, n) : loadu(a1 + b * HW);
      if (pf0) {
        if (MASK & 1) __builtin_prefetch(pf0 + b * HW);
        if (MASK & 2) __builtin_prefetch(pf1 + b * HW);
      }
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        Vec<T> v = loadu(vr + c * HWP + b);
        v = in_register<T>(MODE ? permute<T>(v, idx) : v);
        if (MASK & 1) acc[0][c] += x0 * v;
        if (MASK & 2) acc[1][c] += x1 * v;
      }
    }
  }

  template <int MODE>
  static void run(const T* A, const T* VR, T* O, int64_t HW, int64_t W, int64_t HWP, int64_t WP,
                  int k, int nrows, int64_t s0, int64_t s1, const T* PF, const IVec<T>& idx,
                  int n) {
    Vec<T> acc[2][DC];
#pragma GCC unroll 16
    for (int c = 0; c < DC; ++c) acc[0][c] = acc[1][c] = Vec<T>{};
    const int64_t shi = (nrows == 2 ? s1 : s0) + k;
    for (int64_t s = s0; s < shi; ++s) {
      const int64_t a0 = s - s0, a1 = s - s1;
      const bool v0 = a0 < k, v1 = nrows == 2 && a1 >= 0 && a1 < k;
      const T* p0 = v0 ? A + a0 * k * HW : A;
      const T* p1 = v1 ? A + W + a1 * k * HW : A;
      const T* q0 = PF && v0 ? PF + a0 * k * HW : nullptr;
      const T* q1 = PF && v1 ? PF + W + a1 * k * HW : q0;
      if (!q0) q0 = q1;
      const T* vr = VR + s * WP;
      if (v0 && v1) taps<3, MODE>(acc, p0, p1, vr, q0, q1, HW, HWP, k, idx, n);
      else if (v0) taps<1, MODE>(acc, p0, p1, vr, q0, q1, HW, HWP, k, idx, n);
      else taps<2, MODE>(acc, p0, p1, vr, q0, q1, HW, HWP, k, idx, n);
    }
    for (int u = 0; u < nrows; ++u) {
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        if (MODE == 2) storen(O + u * W + c * HW, acc[u][c], n);
        else storeu(O + u * W + c * HW, acc[u][c]);
      }
    }
  }
};


// ---------------------------------------------------------------------------------- grad attn
// gattn[a*k+b][i][j] = sum_c grad_out[c][i][j] * value[c][s(i)+a][s(j)+b], by the forward's tiles
// (same MODEs: value vectors from the row-padded VP, permuted by idx on border tiles).
// G -> grad_out[c0][i][j0], VR -> VP[c0][0][s(j0)], GA -> gattn[0][i][j0], PF -> gattn of the
// next tile (prefetched for writing) or null.  Channel chunks after the first accumulate.
template <typename T, int DC>
struct GattnChunk {
  static constexpr int U = 4;  // taps in flight per row: independent accumulation chains

  template <int MODE>
  static inline Vec<T> load(const T* p, int n) { return MODE == 2 ? loadn(p, n) : loadu(p); }
  template <int MODE>
  static inline void store(T* p, const Vec<T>& v, int n) {
    if (MODE == 2) storen(p, v, n);
    else storeu(p, v);
  }

  template <int MASK, int MODE>
  static inline void taps(const Vec<T> (&gv)[2][DC], T* __restrict ga0, T* __restrict ga1,
                          const T* __restrict vr, T* pf0, T* pf1, int64_t HW, int64_t HWP, int k,
                          bool first, const IVec<T>& idx, int n) {
    int b = 0;
    for (; b + U <= k; b += U) {
      Vec<T> acc[2][U];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        acc[0][u] = (MASK & 1) && !first ? load<MODE>(ga0 + (b + u) * HW, n) : Vec<T>{};
        acc[1][u] = (MASK & 2) && !first ? load<MODE>(ga1 + (b + u) * HW, n) : Vec<T>{};
      }
      if (pf0) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          if (MASK & 1) __builtin_prefetch(pf0 + (b + u) * HW, 1);
          if (MASK & 2) __builtin_prefetch(pf1 + (b + u) * HW, 1);
        }
      }
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        const T* vp = vr + c * HWP + b;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          Vec<T> v = loadu(vp + u);
          v = in_register<T>(MODE ? permute<T>(v, idx) : v);
          if (MASK & 1) acc[0][u] += gv[0][c] * v;
          if (MASK & 2) acc[1][u] += gv[1][c] * v;
        }
      }
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        if (MASK & 1) store<MODE>(ga0 + (b + u) * HW, acc[0][u], n);
        if (MASK & 2) store<MODE>(ga1 + (b + u) * HW, acc[1][u], n);
      }
    }
    for (; b < k; ++b) {
      Vec<T> acc0 = (MASK & 1) && !first ? load<MODE>(ga0 + b * HW, n) : Vec<T>{};
      Vec<T> acc1 = (MASK & 2) && !first ? load<MODE>(ga1 + b * HW, n) : Vec<T>{};
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        Vec<T> v = loadu(vr + c * HWP + b);
        v = in_register<T>(MODE ? permute<T>(v, idx) : v);
        if (MASK & 1) acc0 += gv[0][c] * v;
        if (MASK & 2) acc1 += gv[1][c] * v;
      }
      if (MASK & 1) store<MODE>(ga0 + b * HW, acc0, n);
      if (MASK & 2) store<MODE>(ga1 + b * HW, acc1, n);
    }
  }

  template <int MODE>
  static void run(const T* G, const T* VR, T* GA, int64_t HW, int64_t W, int64_t HWP, int64_t WP,
                  int k, int nrows, int64_t s0, int64_t s1, T* PF, bool first,
                  const IVec<T>& idx, int n) {
    Vec<T> gv[2][DC];
#pragma GCC unroll 16
    for (int c = 0; c < DC; ++c) {
      gv[0][c] = load<MODE>(G + c * HW, n);
      gv[1][c] = nrows == 2 ? load<MODE>(G + W + c * HW, n) : Vec<T>{};
    }
    const int64_t shi = (nrows == 2 ? s1 : s0) + k;
    for (int64_t s = s0; s < shi; ++s) {
      const int64_t a0 = s - s0, a1 = s - s1;
      const bool v0 = a0 < k, v1 = nrows == 2 && a1 >= 0 && a1 < k;
      T* p0 = v0 ? GA + a0 * k * HW : GA;
      T* p1 = v1 ? GA + W + a1 * k * HW : GA;
      T* q0 = PF && v0 ? PF + a0 * k * HW : nullptr;
      T* q1 = PF && v1 ? PF + W + a1 * k * HW : q0;
      if (!q0) q0 = q1;
      const T* vr = VR + s * WP;
      if (v0 && v1) taps<3, MODE>(gv, p0, p1, vr, q0, q1, HW, HWP, k, first, idx, n);
      else if (v0) taps<1, MODE>(gv, p0, p1, vr, q0, q1, HW, HWP, k, first, idx, n);
      else taps<2, MODE>(gv, p0, p1, vr, q0, q1, HW, HWP, k, first, idx, n);
    }
  }
};

// --------------------------------------------------------------------------------- grad value
// Source rows p (and p + 1).  GPAD -> grad_out[c0][0][0] of [D][H][WG], column j stored at
// j + r, zeros wherever j is not interior.  AP0 / AP1: scratch [ni][k][WG] holding, for every
// contributing row i = ilo + ii, the k taps of tap row a = p - s(i) (resp. p + 1 - s(i)), same
// padding; `valid` bit 0/1 says whether row i contributes to p / p + 1.  GV ->
// grad_value[c0][p][0].
template <typename T, int DC>
struct GvalueChunk {
  template <int MASK>
  static inline void taps(Vec<T> (&acc)[2][DC], const T* __restrict ap0,
                          const T* __restrict ap1, const T* __restrict gp, int64_t HWG,
                          int64_t WG, int64_t q0, int k, int r) {
    for (int b = 0; b < k; ++b) {
      // source column q = q0 + l receives pixel j = q + r - b (tap b), stored at j + r.
      const int64_t off = q0 + 2 * r - b;
      Vec<T> x0{}, x1{};
      if (MASK & 1) x0 = loadu(ap0 + b * WG + off);
      if (MASK & 2) x1 = loadu(ap1 + b * WG + off);
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        const Vec<T> gvec = in_register<T>(loadu(gp + c * HWG + off));
        if (MASK & 1) acc[0][c] += x0 * gvec;
        if (MASK & 2) acc[1][c] += x1 * gvec;
      }
    }
  }

  static void run(const T* AP0, const T* AP1, const unsigned char* valid, const T* GPAD, T* GV,
                  const Geo& g, int64_t WG, int64_t ilo, int ni, int np, int64_t q0, int nq) {
    constexpr int L = lanes<T>();
    const int k = g.k, r = g.r;
    const int64_t HWG = g.H * WG;
    Vec<T> acc[2][DC];
#pragma GCC unroll 16
    for (int c = 0; c < DC; ++c) acc[0][c] = acc[1][c] = Vec<T>{};
    for (int ii = 0; ii < ni; ++ii) {
      const T* ap0 = AP0 + (int64_t)ii * k * WG;
      const T* ap1 = AP1 + (int64_t)ii * k * WG;
      const T* gp = GPAD + (ilo + ii) * WG;
      switch (valid[ii]) {
        case 3: taps<3>(acc, ap0, ap1, gp, HWG, WG, q0, k, r); break;
        case 1: taps<1>(acc, ap0, ap1, gp, HWG, WG, q0, k, r); break;
        case 2: taps<2>(acc, ap0, ap1, gp, HWG, WG, q0, k, r); break;
        default: break;
      }
    }
    const int64_t HW = g.HW();
    for (int u = 0; u < np; ++u) {
      T* dst = GV + u * g.W + q0;
      if (nq == L) {
#pragma GCC unroll 16
        for (int c = 0; c < DC; ++c) storeu(dst + c * HW, acc[u][c]);
      } else {
        for (int c = 0; c < DC; ++c)
          for (int l = 0; l < nq; ++l) dst[c * HW + l] = acc[u][c][l];
      }
    }
  }
};

// --------------------------------------------------------------------------- chunk dispatch
// Channel chunks are powers of two (8, 4, 2, 1): few template instances keep the build short.
template <typename T, template <typename, int> class K, typename... Args>
void dispatch_chunk(int dc, Args... args) {
  switch (dc) {
    case 8: K<T, 8>::run(args...); break;
    case 4: K<T, 4>::run(args...); break;
    case 2: K<T, 2>::run(args...); break;
    case 1: K<T, 1>::run(args...); break;
    default: break;
  }
}

// Two rows x chunk channels of accumulators live in registers.
constexpr int kMaxChunk = kMaxChunkF / 2 > 0 ? kMaxChunkF / 2 : 1;
inline std::vector<std::pair<int64_t, int>> channel_chunks(int64_t D) {
  std::vector<std::pair<int64_t, int>> out;
  int64_t d0 = 0;
  for (int size = kMaxChunk; size >= 1; size /= 2)
    for (; D - d0 >= size; d0 += size) out.emplace_back(d0, size);
  return out;
}

// Tasks: blocks of kRowsPerTask rows of one group, walked in pairs.
inline int64_t num_tasks(const Geo& g) { return g.BG * ((g.H + kRowsPerTask - 1) / kRowsPerTask); }

// Tile kernels K<T, DC>::run<MODE> (forward, grad_attn): channel chunk and tile MODE are
// template parameters, picked here at run time.
template <typename T, template <typename, int> class K, int MODE, typename... Args>
void dispatch_chunk_mode(int dc, Args... args) {
  switch (dc) {
    case 8: K<T, 8>::template run<MODE>(args...); break;
    case 4: K<T, 4>::template run<MODE>(args...); break;
    case 2: K<T, 2>::template run<MODE>(args...); break;
    case 1: K<T, 1>::template run<MODE>(args...); break;
    default: break;
  }
}
template <typename T, template <typename, int> class K, typename... Args>
void dispatch_tile(int dc, int mode, Args... args) {
  if (mode == 0) dispatch_chunk_mode<T, K, 0>(dc, args...);
  else if (mode == 1) dispatch_chunk_mode<T, K, 1>(dc, args...);
  else dispatch_chunk_mode<T, K, 2>(dc, args...);
}

// Tiles of a row for the forward and grad_attn kernels: L pixels starting at min(t * L, W - L)
// (the last one overlaps its predecessor: the overlap is recomputed and stored again, never
// accumulated), or one narrow tile at 0 when W < L.  idx[t][l] = s(j0 + l) - s(j0).
struct RowTile {
  int64_t j0, s;  // first pixel, its window start
  int mode;       // 0 interior, 1 border, 2 narrow (see FwdChunk)
};

template <typename T>
int plan_tiles(const Geo& g, std::vector<RowTile>& tiles, std::vector<IVec<T>>& idx) {
  constexpr int L = lanes<T>();
  const int n = (int)std::min<int64_t>(L, g.W);
  for (int64_t t = 0; t * L < g.W; ++t) {
    const int64_t j0 = std::max<int64_t>(0, std::min<int64_t>(t * L, g.W - L));
    const int64_t s = window_start(j0, g.W, g.k);
    IVec<T> ix{};
    bool identity = true;
    for (int l = 0; l < n; ++l) {
      ix[l] = (typename IVecOf<T>::I)(window_start(j0 + l, g.W, g.k) - s);
      identity = identity && ix[l] == l;
    }
    tiles.push_back({j0, s, g.W < L ? 2 : identity ? 0 : 1});
    idx.push_back(ix);
  }
  return n;
}

template <typename T>
void forward_impl(const T* attn, const T* vp, T* out, const Geo& g, int64_t WP, int nthreads) {
  const int64_t HW = g.HW(), HWP = g.H * WP, T2 = (int64_t)g.k * g.k;
  std::vector<RowTile> tiles;
  std::vector<IVec<T>> idx;
  const int n = plan_tiles<T>(g, tiles, idx);
  const auto chunks = channel_chunks(g.D);
  const int64_t blocks = (g.H + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(num_tasks(g), nthreads, [&](int64_t task, int) {
    const int64_t bg = task / blocks, i_begin = (task % blocks) * kRowsPerTask;
    const int64_t i_end = std::min<int64_t>(g.H, i_begin + kRowsPerTask);
    const T* A = attn + bg * T2 * HW;
    const T* V = vp + bg * g.D * HWP;
    T* O = out + bg * g.D * HW;
    for (int64_t i = i_begin; i < i_end; i += 2) {
      const int nrows = (int)std::min<int64_t>(2, i_end - i);
      const int64_t s0 = window_start(i, g.H, g.k);
      const int64_t s1 = nrows == 2 ? window_start(i + 1, g.H, g.k) : s0;
      for (size_t t = 0; t < tiles.size(); ++t) {
        const RowTile& tile = tiles[t];
        const T* pf = t + 1 < tiles.size() ? A + i * g.W + tiles[t + 1].j0
                      : i + 2 < i_end ? A + (i + 2) * g.W + tiles[0].j0 : nullptr;
        bool first = true;
        for (auto& ch : chunks) {
          const T* a = A + i * g.W + tile.j0;
          const T* vr = V + ch.first * HWP + tile.s;
          T* o = O + ch.first * HW + i * g.W + tile.j0;
          const T* p = first ? pf : (const T*)nullptr;
          dispatch_tile<T, FwdChunk>(ch.second, tile.mode, a, vr, o, HW, g.W, HWP, WP, g.k,
                                     nrows, s0, s1, p, idx[t], n);
          first = false;
        }
      }
    }
  });
}

template <typename T>
void grad_attn_impl(const T* grad_out, const T* vp, T* gattn, const Geo& g, int64_t WP,
                    int nthreads) {
  const int64_t HW = g.HW(), HWP = g.H * WP, T2 = (int64_t)g.k * g.k;
  std::vector<RowTile> tiles;
  std::vector<IVec<T>> idx;
  const int n = plan_tiles<T>(g, tiles, idx);
  const auto chunks = channel_chunks(g.D);
  const int64_t blocks = (g.H + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(num_tasks(g), nthreads, [&](int64_t task, int) {
    const int64_t bg = task / blocks, i_begin = (task % blocks) * kRowsPerTask;
    const int64_t i_end = std::min<int64_t>(g.H, i_begin + kRowsPerTask);
    const T* G = grad_out + bg * g.D * HW;
    const T* V = vp + bg * g.D * HWP;
    T* GA = gattn + bg * T2 * HW;
    for (int64_t i = i_begin; i < i_end; i += 2) {
      const int nrows = (int)std::min<int64_t>(2, i_end - i);
      const int64_t s0 = window_start(i, g.H, g.k);
      const int64_t s1 = nrows == 2 ? window_start(i + 1, g.H, g.k) : s0;
      for (size_t t = 0; t < tiles.size(); ++t) {
        const RowTile& tile = tiles[t];
        T* pf = t + 1 < tiles.size() ? GA + i * g.W + tiles[t + 1].j0
                : i + 2 < i_end ? GA + (i + 2) * g.W + tiles[0].j0 : nullptr;
        bool first = true;
        for (auto& ch : chunks) {
          const T* gp = G + ch.first * HW + i * g.W + tile.j0;
          const T* vr = V + ch.first * HWP + tile.s;
          T* ga = GA + i * g.W + tile.j0;
          T* p = first ? pf : (T*)nullptr;
          dispatch_tile<T, GattnChunk>(ch.second, tile.mode, gp, vr, ga, HW, g.W, HWP, WP, g.k,
                                       nrows, s0, s1, p, first, idx[t], n);
          first = false;
        }
      }
    }
  });
}

template <typename T>
void grad_value_impl(const T* attn, const T* grad_out, const T* gpad, T* gvalue, const Geo& g,
                     int64_t WG, int nthreads) {
  constexpr int L = lanes<T>();
  const int k = g.k, r = g.r;
  const int64_t HW = g.HW(), T2 = (int64_t)k * k;
  const int64_t max_rows = std::min<int64_t>(g.H, 2 * (int64_t)k);  // rows feeding a pair
  const auto chunks = channel_chunks(g.D);
  const int64_t blocks = (g.H + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t ntasks = num_tasks(g);
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  // Per-thread scratch: padded attention rows for the two source rows (zero outside the
  // interior columns, which are never written), row validity, border accumulators.
  std::vector<std::vector<T>> apad(nt), border(nt);
  std::vector<std::vector<unsigned char>> valid(nt);
  for (int t = 0; t < nt; ++t) {
    apad[t].assign(2 * max_rows * k * WG, T(0));
    border[t].assign(2 * g.D * k + k, T(0));
    valid[t].assign(max_rows, 0);
  }
  const int64_t nint = g.W - 2 * r;
  parallel_for(ntasks, nt, [&](int64_t task, int tid) {
    const int64_t bg = task / blocks, p_begin = (task % blocks) * kRowsPerTask;
    const int64_t p_end = std::min<int64_t>(g.H, p_begin + kRowsPerTask);
    const T* A = attn + bg * T2 * HW;
    const T* G = grad_out + bg * g.D * HW;
    const T* GP = gpad + bg * g.D * g.H * WG;
    T* GV = gvalue + bg * g.D * HW;
    T* ap[2] = {apad[tid].data(), apad[tid].data() + max_rows * k * WG};
    unsigned char* vld = valid[tid].data();
    for (int64_t p = p_begin; p < p_end; p += 2) {
      const int np = (int)std::min<int64_t>(2, p_end - p);
      const int64_t ilo = p < k ? 0 : p - r;
      const int64_t plast = p + np - 1;
      const int64_t ihi = plast >= g.H - k ? g.H - 1 : plast + r;
      const int ni = (int)(ihi - ilo + 1);
      for (int ii = 0; ii < ni; ++ii) {
        const int64_t i = ilo + ii, si = window_start(i, g.H, k);
        vld[ii] = 0;
        for (int u = 0; u < np; ++u) {
          const int64_t a = p + u - si;
          if (a < 0 || a >= k) continue;
          vld[ii] |= (unsigned char)(1 << u);
          for (int b = 0; b < k; ++b) {
            const T* src = A + (a * k + b) * HW + i * g.W + r;
            std::memcpy(ap[u] + ((int64_t)ii * k + b) * WG + 2 * r, src, nint * sizeof(T));
            if (a + 2 < k)  // the same row's taps for source row p + u + 2 (next pair)
              for (int64_t x = 0; x < nint; x += 64 / (int64_t)sizeof(T))
                __builtin_prefetch(src + 2 * k * HW + x);
          }
        }
      }
      for (int64_t q0 = 0; q0 < g.W; q0 += L) {
        const int nq = (int)std::min<int64_t>(L, g.W - q0);
        for (auto& ch : chunks)
          dispatch_chunk<T, GvalueChunk>(ch.second, (const T*)ap[0], (const T*)ap[1],
                                         (const unsigned char*)vld, GP + ch.first * g.H * WG,
                                         GV + ch.first * HW + p * g.W, g, WG, ilo, ni, np, q0, nq);
      }
      if (r == 0) continue;
      // Border pixels: the r pixels on each side share the window starting at 0 (or W - k);
      // their tap b lands on source column b (or W - k + b).
      for (int u = 0; u < np; ++u) {
        T* accl = border[tid].data();
        T* accr = accl + g.D * k;
        T* at = accr + g.D * k;
        std::fill(accl, accl + 2 * g.D * k, T(0));
        for (int ii = 0; ii < ni; ++ii) {
          if (!(vld[ii] & (1 << u))) continue;
          const int64_t i = ilo + ii, a = p + u - window_start(i, g.H, k);
          for (int side = 0; side < 2; ++side) {
            T* acc = side ? accr : accl;
            const int64_t j0 = side ? g.W - r : 0;
            for (int64_t j = j0; j < j0 + r; ++j) {
              for (int b = 0; b < k; ++b) at[b] = A[(a * k + b) * HW + i * g.W + j];
              for (int64_t c = 0; c < g.D; ++c) {
                const T w = G[c * HW + i * g.W + j];
                T* dst = acc + c * k;
                for (int b = 0; b < k; ++b) dst[b] += at[b] * w;
              }
            }
          }
        }
        for (int64_t c = 0; c < g.D; ++c) {
          T* row = GV + c * HW + (p + u) * g.W;
          for (int b = 0; b < k; ++b) {
            row[b] += accl[c * k + b];
            row[g.W - k + b] += accr[c * k + b];
          }
        }
      }
    }
  });
}

}  // namespace

extern "C" {

// Geometry: BG = batch * groups, D channels per group, H x W map, odd k <= min(H, W).
#define NA2D_EXPORT(T, SUF)                                                                    \
  int na2d_lanes_##SUF() { return lanes<T>(); }                                               \
  void na2d_forward_##SUF(const T* attn, const T* vp, T* out, int64_t BG, int64_t D,        \
                          int64_t H, int64_t W, int k, int64_t WP, int nthreads) {           \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    forward_impl<T>(attn, vp, out, g, WP, nthreads);                                         \
  }                                                                                          \
  void na2d_grad_attn_##SUF(const T* grad_out, const T* vp, T* gattn, int64_t BG, int64_t D, \
                            int64_t H, int64_t W, int k, int64_t WP, int nthreads) {         \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    grad_attn_impl<T>(grad_out, vp, gattn, g, WP, nthreads);                                 \
  }                                                                                          \
  void na2d_grad_value_##SUF(const T* attn, const T* grad_out, const T* gpad, T* gvalue,     \
                             int64_t BG, int64_t D, int64_t H, int64_t W, int k, int64_t WG, \
                             int nthreads) {                                                 \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    grad_value_impl<T>(attn, grad_out, gpad, gvalue, g, WG, nthreads);                       \
  }

NA2D_EXPORT(float, f32)
NA2D_EXPORT(double, f64)
#undef NA2D_EXPORT

}  // extern "C"
