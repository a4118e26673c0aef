// Neighbourhood aggregation (ContMix "AV", NATTEN 0.17 clamped windows) for CPUs.
//
// Plain C++17 without torch headers (GCC/Clang vector extensions; AVX-512 intrinsics only for
// masked loads and stores), called through ctypes (see ../na2d_cpu.py for the build, the cache
// and the autograd wiring).
// Layouts (contiguous):
//
//   attn  [BG][T = k*k][H][W]     value / out / grad_out  [BG][D][H][W]
//
// or, where the entry point gets pm = 1, attn and grad_attn pixel-major,
// [BG][H][W][T] (NATTEN's layout; OverLoCK's kernel generation writes it directly on the CPU):
// one block of pixels then reads its taps from one run of memory instead of k*k planes.
//
// For kernel k, r = k / 2 and an axis of length L >= k, position i reads the window that starts at
// s(i) = clamp(i - r, 0, L - k).  Tap t = a * k + b of pixel (i, j) reads value at
// (s(i) + a, s(j) + b).
//
// forward: vectorised over channels, in blocks of kPix pixels of a row whose window offsets are
// compile-time constants (interior blocks, and the blocks at the two ends of a row whose windows
// are clamped); see FwdBlock.
//
// grad_attn: vectorised along W ("lanes" = one SIMD register of T), in tiles of `lanes` pixels.
// On an interior tile (every pixel r <= j < W - r, so s(j) = j - r) each tap reads consecutive
// value columns: one unaligned vector load per FMA.  On a border tile the window start is clamped
// for some lanes, but s(j0 + l) - s(j0) is still a fixed per-tile index vector, so the same load
// followed by one permute serves all L pixels (no per-pixel path; maps narrower than a vector are
// one partial tile).  Value is read from a copy whose rows are padded by one vector, so no load
// leaves it.  With pixel-major attention, where k fits one vector and that uses the lanes well
// enough (gattn_pm_fits: every k >= 9, narrow rows), it is vectorised over the k taps of a tap
// row instead and written in place (GattnPm).
//
// grad_value is computed as a *gather* over the inverse neighbourhood (no scatter, no atomics):
// the rows i whose window contains source row p form a contiguous range, and along W every
// interior pixel j is its own window centre, so with zero padding outside the interior columns
// (grad_out in `gpad`, attention in a per-row scratch) the interior contribution to a tile of
// source columns q is a plain shifted sum.  The r border pixels on each side share one window
// (starting at 0 or W - k) and are added separately.  With pixel-major attention (where a
// compiled block fits) it is a scatter instead, vectorised over channels like the forward, into
// a per-group scratch (no atomics either): see GvalueBlock.
//
// Work is split over tasks ((group, rows) for grad_attn and the tap-major grad_value, groups
// for the forward and the pixel-major grad_value) handed out by an atomic counter to persistent
// worker threads (thread_pool.h), so a descheduled thread on a shared machine does not stall
// the others at a barrier.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>  // masked loads / stores only (loadn, storen)
#endif

#include "thread_pool.h"

namespace {

using na2d::parallel_for;
using na2d::thread_scratch;

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

// A value vector feeds several FMAs (two output rows in the gradient tiles). Left alone, GCC
// folds the load into each FMA, i.e. loads it again per FMA -- and these loads, unaligned, are
// what the tile loops are bound by. The empty asm pins the vector in a register (no code
// emitted).
template <typename T>
inline Vec<T> in_register(Vec<T> v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(v));
#endif
  return v;
}

// First n (< lanes) elements only, the rest zero / untouched: rows shorter than a vector, the
// last tile or block of a row.  With AVX-512 these are masked loads / stores; the portable
// memcpy of a run-time length compiles to a byte copy, which made the partial tiles of the
// forward's channels-last copy ~4x dearer than full ones (measured: the copy of a 25x42 map,
// 16 channels, 8.5 -> 4.9 us; the stage-4 detection forward 1.14-1.23x faster).
template <typename T>
inline Vec<T> loadn(const T* p, int n) {
#if defined(__AVX512F__)
  if constexpr (kVecBytes == 64 && sizeof(T) == 4)
    return (Vec<T>)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  if constexpr (kVecBytes == 64 && sizeof(T) == 8)
    return (Vec<T>)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1), p);
#endif
  Vec<T> v{};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}
template <typename T>
inline void storen(T* p, const Vec<T>& v, int n) {
#if defined(__AVX512F__)
  if constexpr (kVecBytes == 64 && sizeof(T) == 4) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
    return;
  }
  if constexpr (kVecBytes == 64 && sizeof(T) == 8) {
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof(T) * n);
}

inline int64_t window_start(int64_t i, int64_t len, int k) {
  int64_t s = i - k / 2;
  if (s > len - k) s = len - k;
  if (s < 0) s = 0;
  return s;
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
// The forward vectorises over *channels*: each group's value is first copied channels-last, VT
// [NV][H][W][L] (NV = ceil(D / L) channel vectors, zero padded; to_channels_last), so the value
// of one pixel is one aligned vector and every attention weight is a scalar broadcast folded into
// its FMA (vfmaddps m32{1to16}).  A block is P consecutive pixels of one row (P = kPix or
// kPixAlt; kPixNarrow on narrow maps) with one accumulator vector each:
//   acc[p] += attn[a*k+b][i][j0+p] * VT[s(i)+a][x0 + off[p] + b]
// where x0 is the window start of the block's first pixel and off[p] that of pixel p relative to
// it.  Walking the value columns x of a window row, each value vector loaded feeds every pixel
// whose window contains it (b = x - off[p]), so per FMA there is one broadcast and only
// (P + k - 1) / (P * k) value loads -- no unaligned vector loads, no permutes.  Borders need no
// special path either: a block starting at column 0 (or ending at W) has clamped windows, i.e. a
// different, still compile-time, off[] (col_off).  The few (k, W) without a compiled kernel (k
// outside kFixedK, or maps too narrow: blocks_fit) take fwd_block_any, which reads each pixel's
// window separately.
//
// The FMAs broadcast the attention taps straight from `attn` ([tap][H][W]: k*k streams a plane
// apart, a runtime stride), except on maps whose plane stride makes a window row's taps collide
// in the L1 cache (taps_spread): there each block's taps are first copied into a small
// [tap][kPix] buffer, whose constant stride makes every tap address an offset from one register.
// The first kernels always copied; on the AMD EPYC VM that copy was the whole gap between the op
// and its bare block kernel (one thread, attention kept L2-resident: 1110 ns per 14-pixel k = 13
// block with it, 743 without).  The taps and (k >= kPrefetchOutputMinK) the output of the block
// kPrefetchBlocks ahead are prefetched while this one computes: k*k streams are more than the
// hardware prefetchers track.  Pixel-major attention ([H][W][tap]) is read in place: a block's
// taps are one run of P * k * k elements, with every tap address a constant offset from one
// register, prefetched a K-th per window row (without that prefetch the hardware did not keep up:
// 2.2 against 1.1 ms at the k = 13 detection map); that layout ran the k = 13 forward 1.2-1.8x
// faster than the tap-major one (docs/performance.md).  Output is written back channel-major
// through an in-register transpose.
constexpr int kPix = kVecBytes == 64 ? 16 : 8;  // most pixels (accumulator vectors) per block
// Block widths compiled: kPix, and 14 where registers allow -- per map the width with fewer
// pixels computed in all is used (84 = 6 x 14 at a detection stage-3 map, 42 = 3 x 14 at
// stage 4, where 16-pixel blocks compute 96 and 48).
constexpr int kPixAlt = kPix >= 14 ? 14 : kPix;
// Narrow widths, used only where neither of the above fits (blocks_fit): the classification
// maps.  A 14x14 map at k = 13 is two 8-pixel border blocks (windows clamped on one side each,
// pixels 6 and 7 computed twice), a 7x7 map at k = 5 or 7 two 4-pixel ones; without them those
// maps took fwd_block_any, one value load per FMA.
constexpr int kPixNarrow[] = {8, 4};

// f receives block width P (one of the above) as a compile-time constant
// (std::integral_constant); the forward's and grad_value's block kernels are templated on it.
template <typename F>
void with_block_width(int P, F&& f) {
  if (P == kPix) f(std::integral_constant<int, kPix>{});
  else if (P == kPixAlt) f(std::integral_constant<int, kPixAlt>{});
  else if (P == kPixNarrow[0]) f(std::integral_constant<int, kPixNarrow[0]>{});
  else f(std::integral_constant<int, kPixNarrow[1]>{});
}

// Window start of pixel p of a P-pixel block relative to that of pixel 0.  POS 0: interior
// block (no clamping); 1: block at column 0 (windows clamped at 0); 2: block ending at column
// W - 1.
template <int K, int POS, int P>
constexpr int col_off(int p) {
  return POS == 0   ? p
         : POS == 1 ? (p > K / 2 ? p - K / 2 : 0)
                    : (p < P - 1 - K / 2 ? p : P - 1 - K / 2);
}

// Lane transpose of L vectors of L lanes: m[p][c] -> m[c][p], in log2(L) butterfly stages of
// two-source shuffles (vpermt2ps on AVX-512).  Stage H swaps the off-diagonal H x H blocks of
// each 2H x 2H block: row i (i & H == 0) keeps its lanes j with j & H == 0 and takes row i + H's
// lanes j - H for the others; row i + H the mirror image.  Templated on H so that everything
// unrolls and the index vectors are constants (m stays in registers).
template <typename T, int H>
inline void transpose_stage(Vec<T>* m) {
  constexpr int L = lanes<T>();
  IVec<T> lo, hi;
#pragma GCC unroll 16
  for (int j = 0; j < L; ++j) {
    lo[j] = (j & H) ? L + j - H : j;
    hi[j] = (j & H) ? L + j : j + H;
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const Vec<T> x = m[i], y = m[i + H];
#if defined(__GNUC__) && !defined(__clang__)
    m[i] = __builtin_shuffle(x, y, lo);
    m[i + H] = __builtin_shuffle(x, y, hi);
#else
    for (int j = 0; j < L; ++j) {
      m[i][j] = lo[j] < L ? x[lo[j]] : y[lo[j] - L];
      m[i + H][j] = hi[j] < L ? x[hi[j]] : y[hi[j] - L];
    }
#endif
  }
  if constexpr (H > 1) transpose_stage<T, H / 2>(m);
}

template <typename T>
inline void transpose(Vec<T>* m) {
  transpose_stage<T, lanes<T>() / 2>(m);
}

// acc[p] holds channels c0.. of pixel j0 + p: store channels c < nc, pixels p < n to O
// (-> out[c0][i][j0]).  With `spill`, whole vectors are stored even past n (the caller knows the
// row holds them and that a later block rewrites them), which spares partial stores -- a
// 14-pixel block stores 16.
template <typename T>
inline void store_block(Vec<T> (&acc)[kPix], T* O, int64_t HW, int nc, int n, bool spill) {
  constexpr int L = lanes<T>();
  for (int q = 0; q < kPix && q < n; q += L) {
    Vec<T>* m = acc + q;
    transpose<T>(m);
    const int m_n = std::min(L, n - q);
    if (m_n == L || spill) {
#pragma GCC unroll 16
      for (int c = 0; c < L; ++c)
        if (c < nc) storeu(O + c * HW + q, m[c]);
    } else {
      for (int c = 0; c < nc; ++c) storen(O + c * HW + q, m[c], m_n);
    }
  }
}

template <typename T, int K, int POS, int P>
struct FwdBlock {
  static constexpr int L = lanes<T>();
  static constexpr int NX = col_off<K, POS, P>(P - 1) + K;  // value columns a window row spans

  // One window row: PK -> its first tap at the block's first pixel (tap b of pixel p at
  // pk[b * stride + p * PS]; stride TS, or ts where TS is 0; PS = 1, or K * K in the
  // pixel-major layout, TS = 1), VR -> the value row at the block's window start.
  template <int TS>
  static inline void row(Vec<T> (&acc)[kPix], const T* __restrict pk, int64_t ts,
                         const T* __restrict vr) {
    const int64_t stride = TS ? TS : ts;
    constexpr int PS = TS == 1 ? K * K : 1;
#pragma GCC unroll 64
    for (int x = 0; x < NX; ++x) {
      const Vec<T> v = in_register<T>(loadu(vr + x * L));
#pragma GCC unroll 64
      for (int p = 0; p < P; ++p) {
        const int b = x - col_off<K, POS, P>(p);
        if (b >= 0 && b < K) acc[p] += pk[b * stride + p * PS] * v;
      }
    }
  }

  template <int TS>
  static inline void rows(Vec<T> (&acc)[kPix], const T* pk, int64_t ts, const T* vb, int64_t WL,
                          int64_t HW, const T* pf) {
    // pixel-major: the taps of the block ahead are P * K * K consecutive elements, a K-th of
    // their cache lines prefetched per window row
    constexpr int kLines = (P * K * K * (int)sizeof(T) + 63) / 64;
    for (int a = 0; a < K; ++a) {
      if (pf && TS == 1) {
        for (int l = a * kLines / K; l < (a + 1) * kLines / K; ++l)
          __builtin_prefetch((const char*)pf + l * 64, 0, 1);
      } else if (pf) {
        for (int b = 0; b < K; ++b) __builtin_prefetch(pf + (a * K + b) * HW, 0, 1);
      }
      row<TS>(acc, pk + a * K * (TS ? TS : ts), ts, vb + a * WL);
    }
  }

  // PK -> the block's first tap at its first pixel, taps TS apart: attn[0][i][j0] and HW, the
  // packed copy and kPix (see forward_impl), or pixel-major attn[i][j0][0] and 1 (taps
  // consecutive, pixels K * K apart), compiled apart -- with the packed copy's constant
  // stride every tap address is an offset from one register (the packed path measured
  // 1.06-1.18x slower through the runtime-stride code); VB -> VT[c-vector][s(i)][x0]; WL = W * L
  // (value row stride); O -> out[c0][i][j0]; SPILL: see store_block.  PF / PFO -> attention
  // (attn[0][i'][j0']) and output (out[0][i'][j0']) of a block computed later, prefetched now,
  // or null.
  static void run(const T* pk, int64_t ts, const T* vb, int64_t WL, T* O, int64_t HW, int nc,
                  int n, bool spill, const T* pf, T* pfo) {
    static_assert(P <= kPix, "block wider than the accumulators");
    if (pfo)
      for (int c = 0; c < nc; ++c) __builtin_prefetch(pfo + c * HW, 1, 1);
    Vec<T> acc[kPix];
    for (int p = 0; p < kPix; ++p) acc[p] = Vec<T>{};
    if (ts == kPix) rows<kPix>(acc, pk, ts, vb, WL, HW, pf);
    else if (ts == 1) rows<1>(acc, pk, ts, vb, WL, HW, pf);  // pixel-major
    else rows<0>(acc, pk, ts, vb, WL, HW, pf);
    store_block<T>(acc, O, HW, nc, n, spill);
  }
};

// Any k and map: every pixel reads its own window (SJ: window starts of the block's n pixels).
// The pixels are the inner loop, so NP independent accumulators are in flight instead of one
// chain of k * k dependent FMAs per pixel (the forward at three classification maps ran
// 1.16-1.19x faster in the op harness, at 7x7 k = 5 0.91x); NP is the compiled width >= n, and
// pixels n..NP-1 repeat pixel 0's window with zero taps (the repack zero-fills them) and are
// not stored.
template <typename T, int NP>
void fwd_block_any(const T* pk, const T* vrow, int64_t WL, const int64_t* sj, int k, T* O,
                   int64_t HW, int nc, int n, bool spill) {
  constexpr int L = lanes<T>();
  Vec<T> acc[kPix] = {};  // store_block transposes whole vectors of pixels
  const T* vp[NP];
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p) vp[p] = vrow + (p < n ? sj[p] : sj[0]) * L;
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b) {
      const T* w = pk + (int64_t)(a * k + b) * kPix;
      const int64_t off = a * WL + (int64_t)b * L;
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[p] += w[p] * loadu(vp[p] + off);
    }
  store_block<T>(acc, O, HW, nc, n, spill);
}

template <typename T>
void fwd_block_any(const T* pk, const T* vrow, int64_t WL, const int64_t* sj, int k, T* O,
                   int64_t HW, int nc, int n, bool spill) {
  if (n <= 4) fwd_block_any<T, 4>(pk, vrow, WL, sj, k, O, HW, nc, n, spill);
  else if (n <= 8) fwd_block_any<T, 8>(pk, vrow, WL, sj, k, O, HW, nc, n, spill);
  else fwd_block_any<T, kPix>(pk, vrow, WL, sj, k, O, HW, nc, n, spill);
}

// ---------------------------------------------------------------------------------- grad attn
// gattn[a*k+b][i][j] = sum_c grad_out[c][i][j] * value[c][s(i)+a][s(j)+b] for a tile of L
// consecutive pixels j = j0 + l.  Within a tile, s(j0 + l) = s(j0) + idx[l] with idx
// non-decreasing in 0..L-1: the identity on interior tiles, flat where the window is clamped at
// a border.  So for every tap one vector load of value (from the row-padded copy VP, [D][H][WP],
// WP = W + L: loads never leave the buffer) at column s(j0) + b, permuted by idx on border tiles,
// feeds L pixels.  MODE 0: interior tile; 1: border tile (permute); 2: narrow map, W < L
// (permute, and the grad_out / gattn rows are W long: partial loads and stores).  Rows are
// processed in pairs (see kRowsPerTask).
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
                          const T* __restrict vr, T* pf0, T* pf1, int64_t HWA, int64_t HWP,
                          int k, bool first, const IVec<T>& idx, int n) {
    int b = 0;
    for (; b + U <= k; b += U) {
      Vec<T> acc[2][U];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        acc[0][u] = (MASK & 1) && !first ? load<MODE>(ga0 + (b + u) * HWA, n) : Vec<T>{};
        acc[1][u] = (MASK & 2) && !first ? load<MODE>(ga1 + (b + u) * HWA, n) : Vec<T>{};
      }
      if (pf0) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          if (MASK & 1) __builtin_prefetch(pf0 + (b + u) * HWA, 1);
          if (MASK & 2) __builtin_prefetch(pf1 + (b + u) * HWA, 1);
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
        if (MASK & 1) store<MODE>(ga0 + (b + u) * HWA, acc[0][u], n);
        if (MASK & 2) store<MODE>(ga1 + (b + u) * HWA, acc[1][u], n);
      }
    }
    for (; b < k; ++b) {
      Vec<T> acc0 = (MASK & 1) && !first ? load<MODE>(ga0 + b * HWA, n) : Vec<T>{};
      Vec<T> acc1 = (MASK & 2) && !first ? load<MODE>(ga1 + b * HWA, n) : Vec<T>{};
#pragma GCC unroll 16
      for (int c = 0; c < DC; ++c) {
        Vec<T> v = loadu(vr + c * HWP + b);
        v = in_register<T>(MODE ? permute<T>(v, idx) : v);
        if (MASK & 1) acc0 += gv[0][c] * v;
        if (MASK & 2) acc1 += gv[1][c] * v;
      }
      if (MASK & 1) store<MODE>(ga0 + b * HWA, acc0, n);
      if (MASK & 2) store<MODE>(ga1 + b * HWA, acc1, n);
    }
  }

  // HW: plane stride of grad_out; HWA: that of GA (HW, or a row-pair scratch's 2 * W).
  template <int MODE>
  static void run(const T* G, const T* VR, T* GA, int64_t HW, int64_t HWA, int64_t W,
                  int64_t HWP, int64_t WP, int k, int nrows, int64_t s0, int64_t s1, T* PF,
                  bool first, const IVec<T>& idx, int n) {
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
      T* p0 = v0 ? GA + a0 * k * HWA : GA;
      T* p1 = v1 ? GA + W + a1 * k * HWA : GA;
      T* q0 = PF && v0 ? PF + a0 * k * HWA : nullptr;
      T* q1 = PF && v1 ? PF + W + a1 * k * HWA : q0;
      if (!q0) q0 = q1;
      const T* vr = VR + s * WP;
      if (v0 && v1) taps<3, MODE>(gv, p0, p1, vr, q0, q1, HWA, HWP, k, first, idx, n);
      else if (v0) taps<1, MODE>(gv, p0, p1, vr, q0, q1, HWA, HWP, k, first, idx, n);
      else taps<2, MODE>(gv, p0, p1, vr, q0, q1, HWA, HWP, k, first, idx, n);
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
// f receives the chunk as a compile-time constant (std::integral_constant).
template <typename F>
void with_chunk(int dc, F&& f) {
  switch (dc) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// with_chunk plus chunks of kMaxChunkF (one row of accumulators: GvalueBorder).
template <typename F>
void with_border_chunk(int dc, F&& f) {
  if (dc == 16) f(std::integral_constant<int, 16>{});
  else with_chunk(dc, f);
}

// Two rows x chunk channels of accumulators live in registers.
constexpr int kMaxChunk = kMaxChunkF / 2 > 0 ? kMaxChunkF / 2 : 1;
inline std::vector<std::pair<int64_t, int>> channel_chunks(int64_t D, int max = kMaxChunk) {
  std::vector<std::pair<int64_t, int>> out;
  int64_t d0 = 0;
  for (int size = max; size >= 1; size /= 2)
    for (; D - d0 >= size; d0 += size) out.emplace_back(d0, size);
  return out;
}

// Tasks: blocks of kRowsPerTask rows of one group, walked in pairs.
inline int64_t num_tasks(const Geo& g) { return g.BG * ((g.H + kRowsPerTask - 1) / kRowsPerTask); }

// fn(bg, i_begin, i_end) for each such task (rows [i_begin, i_end) of group bg) on the pool.
template <typename F>
void parallel_row_blocks(const Geo& g, int nthreads, const F& fn) {
  const int64_t blocks = (g.H + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(num_tasks(g), nthreads, [&](int64_t task, int) {
    const int64_t i_begin = (task % blocks) * kRowsPerTask;
    fn(task / blocks, i_begin, std::min<int64_t>(g.H, i_begin + kRowsPerTask));
  });
}

// Tile kernels K<T, DC>::run<MODE> (grad_attn): channel chunk and tile MODE are template
// parameters, picked here at run time.
template <typename T, template <typename, int> class K, typename... Args>
void dispatch_tile(int dc, int mode, Args... args) {
  with_chunk(dc, [&](auto c) {
    if (mode == 0) K<T, decltype(c)::value>::template run<0>(args...);
    else if (mode == 1) K<T, decltype(c)::value>::template run<1>(args...);
    else K<T, decltype(c)::value>::template run<2>(args...);
  });
}

// Tiles of a row for the grad_attn kernel: L pixels starting at min(t * L, W - L)
// (the last one overlaps its predecessor: the overlap is recomputed and stored again, never
// accumulated), or one narrow tile at 0 when W < L.  idx[t][l] = s(j0 + l) - s(j0).
struct RowTile {
  int64_t j0, s;  // first pixel, its window start
  int mode;       // 0 interior, 1 border, 2 narrow (see GattnChunk)
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

// Blocks between a prefetch and its use: one block ahead was too late on the 2-core Xeon VM
// (Emerald Rapids): 2 to 12 ahead read alike, ~35 % faster at the detection stage-3 k = 13 shape.
constexpr int kPrefetchBlocks = 3;

// The output block is prefetched for writing only from this k up. At k = 13 (detection stage 3)
// it is part of the prefetching that took the forward from 8.5 to 3.9 ms on the Xeon VM; at
// k = 5 / 7 it made the detection-size forward 1.08-1.32x slower with two threads on the AMD
// EPYC VM in three A/B runs of both builds in one process (2026-11-28) and 1.00-1.10x slower in a
// fourth; at k = 13 there the results scattered either way (0.98-1.18x).
constexpr int kPrefetchOutputMinK = 9;

// Kernel sizes with a compiled block kernel (the models use 5, 7 and 13).
constexpr int kFixedK[] = {3, 5, 7, 9, 11, 13};

inline bool compiled_k(int k) {
  for (int kk : kFixedK)
    if (kk == k) return true;
  return false;
}

template <typename T, int POS, int P>
void dispatch_block(int k, const T* pk, int64_t ts, const T* vb, int64_t WL, T* o, int64_t HW,
                    int nc, int n, bool spill, const T* pf, T* pfo) {
  switch (k) {
    case 3: FwdBlock<T, 3, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    case 5: FwdBlock<T, 5, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    case 7: FwdBlock<T, 7, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    case 9: FwdBlock<T, 9, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    case 11: FwdBlock<T, 11, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    case 13: FwdBlock<T, 13, POS, P>::run(pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo); break;
    default: break;
  }
}

template <typename T, int P>
void dispatch_block(int pos, int k, const T* pk, int64_t ts, const T* vb, int64_t WL, T* o,
                    int64_t HW, int nc, int n, bool spill, const T* pf, T* pfo) {
  if (pos == 0) dispatch_block<T, 0, P>(k, pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo);
  else if (pos == 1) dispatch_block<T, 1, P>(k, pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo);
  else dispatch_block<T, 2, P>(k, pk, ts, vb, WL, o, HW, nc, n, spill, pf, pfo);
}

// The blocks of a row: [j0, j0 + n) with window start x0 (of pixel j0) and kind pos (see
// col_off; -1: fwd_block_any).  Compiled kernels of width P: one block at column 0, one ending
// at W - 1, interior blocks in between (the last shifted left to stay interior: overlaps
// recompute the same values).  Valid when a border block's windows clamp on one side only
// (W >= P + r) and the interior blocks fit between the clamped columns (W >= P + 2r, unless
// there are none: W <= 2P) while the border blocks reach them (P >= r); W >= kPix for the
// packed copy's whole-vector loads unless the taps are read in place (DIRECT, see forward_impl).
// Otherwise, or for k without a compiled kernel: generic blocks.
struct Block {
  int64_t j0, x0;
  int pos, n;
};

inline bool blocks_fit(const Geo& g, int P, bool direct) {
  return compiled_k(g.k) && (direct || g.W >= kPix) && g.W >= P + g.r &&
         (g.W <= 2 * P || (g.W >= P + 2 * g.r && P >= g.r));
}

inline std::vector<Block> plan_blocks(const Geo& g, int P, bool direct) {
  std::vector<Block> out;
  if (blocks_fit(g, P, direct)) {
    out.push_back({0, 0, 1, P});
    for (int64_t j = P; j < g.W - P; j += P) {
      const int64_t j0 = std::max<int64_t>(g.r, std::min<int64_t>(j, g.W - g.r - P));
      out.push_back({j0, j0 - g.r, 0, P});
    }
    out.push_back({g.W - P, g.W - P - g.r, 2, P});
  } else {
    for (int64_t j = 0; j < g.W; j += kPix)
      out.push_back({j, 0, -1, (int)std::min<int64_t>(kPix, g.W - j)});
  }
  return out;
}

// Block width for a map: of kPix and kPixAlt the one computing the fewest pixels per row (ties:
// kPix); where neither fits, the widest narrow width that does; else kPix (generic blocks).
inline int block_width(const Geo& g, bool direct) {
  int best = kPix;
  int64_t best_px = -1;
  for (int P : {kPix, kPixAlt}) {
    if (!blocks_fit(g, P, direct)) continue;
    const int64_t px = (int64_t)plan_blocks(g, P, direct).size() * P;
    if (best_px < 0 || px < best_px) best = P, best_px = px;
  }
  if (best_px < 0)
    for (int P : kPixNarrow)
      if (P < kPix && blocks_fit(g, P, direct)) return P;
  return best;
}

// VT[cv][h][w][L] <- value[cv * L + c][h][w] of one group (channels past D zero): the
// forward's channels-last copy, made per group into a per-thread buffer (~270 KB at a detection
// stage-3 map: it stays in L2 while the group computes), L x L tiles through transpose().
template <typename T>
void to_channels_last(const T* V, T* VT, const Geo& g) {
  constexpr int L = lanes<T>();
  const int64_t HW = g.HW(), NV = (g.D + L - 1) / L;
  Vec<T> m[L];
  for (int64_t cv = 0; cv < NV; ++cv)
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w0 = 0; w0 < g.W; w0 += L) {
        const int n = (int)std::min<int64_t>(L, g.W - w0);
        const T* src = V + cv * L * HW + h * g.W + w0;
        const int nc = (int)std::min<int64_t>(L, g.D - cv * L);
        if (n == L && nc == L) {
#pragma GCC unroll 16
          for (int c = 0; c < L; ++c) m[c] = loadu(src + c * HW);
        } else {  // kept apart: partial loads in the same loop defeat the plain ones
          for (int c = 0; c < L; ++c) m[c] = c >= nc ? Vec<T>{} : loadn(src + c * HW, n);
        }
        transpose<T>(m);
        T* dst = VT + ((cv * g.H + h) * g.W + w0) * L;
        if (n == L) {
#pragma GCC unroll 16
          for (int p = 0; p < L; ++p) storeu(dst + p * L, m[p]);
        } else {
          for (int p = 0; p < n; ++p) storeu(dst + p * L, m[p]);
        }
      }
}

// Whether the block kernels broadcast the taps straight from `attn` (else from a packed copy per
// block).  A window row's k taps are a plane (H * W elements) apart; where that stride is a
// multiple of 4 KB, or close to one, they fall into a few sets of the L1 data cache (64 sets of
// 64-byte lines on x86 cores: the set repeats every 4 KB) and evict one another while the row
// computes.  So: direct while at most kMaxTapsPerSet of a window row's taps share a set.
// Measured on the AMD EPYC VM, one thread, 4 groups, k = 13 and 7, A/B in one process against
// the build that always copied (2026-11-28): 16 map / k cases with 1-4 taps a set, 1.01-1.21x
// (the detection maps 50x84 and 25x42 1.17 / 1.21x at k = 13); with direct reads everywhere, the
// 10 cases with all taps in one set (32x128, 16x64, 64x64, 48x64, 32x96) ran 0.54-0.86x, and
// with the copy for them 0.99-1.06x.
constexpr int kMaxTapsPerSet = 4;

inline bool taps_spread(int64_t plane_bytes, int k) {
  int count[64] = {};
  for (int b = 0; b < k; ++b)
    if (++count[((b * plane_bytes) >> 6) & 63] > kMaxTapsPerSet) return false;
  return true;
}

// One task per group (batch x group): its value is transposed once, then its rows are walked
// block by block.  PM: attn is pixel-major (see the top of the file).
template <typename T>
void forward_impl(const T* attn, const T* value, T* out, const Geo& g, int nthreads, bool pm) {
  constexpr int L = lanes<T>();
  const int k = g.k;
  const int64_t HW = g.HW(), T2 = (int64_t)k * k, WL = g.W * L, NV = (g.D + L - 1) / L;
  // pixel-major taps are read in place: one block's taps are one run of memory, no L1 conflicts
  const bool direct = pm || taps_spread(HW * (int64_t)sizeof(T), k);
  const int P = block_width(g, direct);
  const std::vector<Block> blocks = plan_blocks(g, P, direct);
  const int64_t nblocks = (int64_t)blocks.size();
  const int64_t ts = pm ? 1 : direct ? HW : kPix;  // tap stride of what the block kernels read
  const int64_t ps = pm ? T2 : 1;                   // pixel stride of attn
  parallel_for(g.BG, nthreads, [&](int64_t bg, int) {
    const T* A = attn + bg * T2 * HW;
    T* O = out + bg * g.D * HW;
    // the packed taps (one vector of slack in front, see the copy; zeroed so that lanes no pixel
    // uses hold no stale values) and the channels-last value (written in full)
    T* pk = thread_scratch<T, 0>(kPix + T2 * kPix, true) + kPix;
    T* vt = thread_scratch<T, 1>(NV * HW * L, false);
    to_channels_last<T>(value + bg * g.D * HW, vt, g);
    int64_t sj[kPix];
    for (int64_t i = 0; i < g.H; ++i) {
      const int64_t s = window_start(i, g.H, k);
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const Block& blk = blocks[bi];
        if (blk.pos >= 0 && !direct) {
          // taps [t][kPix]: kPix values read from c0 <= j0 (whole vectors stay inside the row)
          // land at t * kPix + (c0 - j0); a shift spills into the previous tap's unused lanes
          const int64_t c0 = std::min<int64_t>(blk.j0, g.W - kPix);
          const T* a = A + i * g.W + c0;
          T* d = pk + (c0 - blk.j0);
          for (int64_t t = 0; t < T2; ++t)
#pragma GCC unroll 4
            for (int q = 0; q < kPix; q += L) storeu(d + t * kPix + q, loadu(a + t * HW + q));
        } else if (blk.pos < 0 && pm) {
          // the n pixels' taps, transposed into [t][kPix] in L x L register tiles (a scalar copy
          // made the classification-size forwards 1.1-1.2x slower than from contiguous weights)
          const T* a = A + (i * g.W + blk.j0) * T2;
          Vec<T> m[L];
          for (int q0 = 0; q0 < kPix; q0 += L)
            for (int64_t t0 = 0; t0 < T2; t0 += L) {
              const int nt = (int)std::min<int64_t>(L, T2 - t0);
#pragma GCC unroll 16
              for (int q = 0; q < L; ++q)
                m[q] = q0 + q < blk.n ? loadn(a + (q0 + q) * T2 + t0, nt) : Vec<T>{};
              transpose<T>(m);
              for (int t = 0; t < nt; ++t) storeu(pk + (t0 + t) * kPix + q0, m[t]);
            }
        } else if (blk.pos < 0) {  // apart: a partial load in the same loop defeats the plain one
          const T* a = A + i * g.W + blk.j0;
          for (int64_t t = 0; t < T2; ++t)
            for (int q = 0; q < kPix; q += L) {
              const int m = std::min(L, blk.n - q);
              storeu(pk + t * kPix + q, m > 0 ? loadn(a + t * HW + q, m) : Vec<T>{});
            }
        }
        // prefetch target: the block kPrefetchBlocks ahead in row-major order
        const int64_t ahead = bi + kPrefetchBlocks, pi = i + ahead / nblocks;
        const int64_t pj = pi < g.H ? pi * g.W + blocks[ahead % nblocks].j0 : -1;
        if (blk.pos < 0)
          for (int p = 0; p < blk.n; ++p) sj[p] = window_start(blk.j0 + p, g.W, k);
        // whole-vector stores past the block where the row holds kPix pixels from j0: blocks go
        // left to right and the row's last one ends at W, so a later block rewrites them (a
        // block shifted left to stay interior can end within kPix - P of the row's end)
        const bool spill = blk.j0 + kPix <= g.W;
        for (int64_t cv = 0; cv < NV; ++cv) {
          const T* vrow = vt + (cv * g.H + s) * WL;
          T* o = O + cv * L * HW + i * g.W + blk.j0;
          const int nc = (int)std::min<int64_t>(L, g.D - cv * L);
          const bool pref = cv == 0 && pj >= 0;
          const T* pf = pref ? A + pj * ps : nullptr;
          T* pfo = pref && k >= kPrefetchOutputMinK ? O + pj : nullptr;
          const T* vb = vrow + blk.x0 * L;
          const T* tp = direct ? A + (i * g.W + blk.j0) * ps : pk;
          if (blk.pos < 0) fwd_block_any<T>(pk, vrow, WL, sj, k, o, HW, nc, blk.n, spill);
          else
            with_block_width(P, [&](auto w) {
              dispatch_block<T, decltype(w)::value>(blk.pos, k, tp, ts, vb, WL, o, HW, nc, P,
                                                    spill, pf, pfo);
            });
        }
      }
    }
  });
}

// Rows u < nrows of a row pair's grad_attn, computed tap-major into SC ([T][2][W]), written to
// pixel-major GA (-> gattn[i][0][0]) through L x L register transposes (taps along the lanes).
template <typename T>
void store_pixel_major(const T* sc, T* GA, int64_t W, int64_t T2, int nrows) {
  constexpr int L = lanes<T>();
  Vec<T> m[L];
  for (int u = 0; u < nrows; ++u)
    for (int64_t x0 = 0; x0 < W; x0 += L) {
      const int nx = (int)std::min<int64_t>(L, W - x0);
      for (int64_t t0 = 0; t0 < T2; t0 += L) {
        const int nt = (int)std::min<int64_t>(L, T2 - t0);
        const T* src = sc + t0 * 2 * W + u * W + x0;
        for (int t = 0; t < L; ++t)
          m[t] = t >= nt ? Vec<T>{} : nx == L ? loadu(src + t * 2 * W) : loadn(src + t * 2 * W, nx);
        transpose<T>(m);
        T* dst = GA + (u * W + x0) * T2 + t0;
        for (int x = 0; x < nx; ++x) {
          if (nt == L) storeu(dst + x * T2, m[x]);
          else storen(dst + x * T2, m[x], nt);
        }
      }
    }
}

// Pixel-major grad_attn, vectorised over the taps of one tap row:
//   gattn[i][j][a * K + b] = sum_c grad_out[c][i][j] * value[c][s(i) + a][s(j) + b],  b < K
// is one vector of K lanes (K <= lanes): the value columns s(j)..s(j) + K - 1 of a row, one
// masked load (K lanes: it never leaves the row), times grad_out[c][i][j] broadcast.  Rows i
// and i + 1 go together: their tap rows read the source rows s(i) .. s(i + 1) + K - 1 (S1 =
// s(i + 1) - s(i): 1, or 0 where the windows are clamped), so each value load feeds both
// pixels' FMAs, and their 2K accumulators (26 at k = 13) stay in registers over all channels.
// Each pixel's taps are then stored where they belong, K at a time: no tap-major scratch, no
// transposes.
constexpr int kVecRegs = kVecBytes == 64 ? 32 : 16;

// Compiled for K where a tap row is one vector and the registers hold 2K accumulators, two
// broadcasts and the value vector.
template <typename T>
constexpr bool gattn_pm_compiled(int k) {
  return k <= lanes<T>() && 2 * k + 3 <= kVecRegs;
}

template <typename T, int K>
struct GattnPm {
  static constexpr bool kFits = gattn_pm_compiled<T>(K);

  // G -> grad_out[0][i][j], VR -> value[0][s(i)][s(j)], GA -> gattn[i][j][0]; row i + 1's
  // pixel is W further in grad_out and W * K * K further in gattn.
  template <int S1, int NR>
  __attribute__((noinline)) static void pixel(const T* __restrict G, const T* __restrict VR,
                                              T* __restrict GA, int64_t W, int64_t HW,
                                              int64_t D) {
    Vec<T> acc0[K], acc1[K];
#pragma GCC unroll 16
    for (int a = 0; a < K; ++a) acc0[a] = acc1[a] = Vec<T>{};
    for (int64_t c = 0; c < D; ++c) {
      const T x0 = G[c * HW], x1 = NR == 2 ? G[c * HW + W] : T(0);
      const T* v = VR + c * HW;
#pragma GCC unroll 16
      for (int o = 0; o < K + (NR == 2 ? S1 : 0); ++o) {
        const Vec<T> vv = in_register<T>(loadn(v + o * W, K));
        if (o < K) acc0[o] += x0 * vv;
        if (NR == 2 && o >= S1) acc1[o - S1] += x1 * vv;
      }
    }
    // whole vectors where their lanes past K land on the pixel's next tap row (stored next):
    // a * K + L <= K * K up to a = K - 2 where L <= 2K; masked stores otherwise
    constexpr int kWhole = lanes<T>() <= 2 * K ? K - 1 : 0;
#pragma GCC unroll 16
    for (int a = 0; a < K; ++a) {
      if (a < kWhole) {
        storeu(GA + a * K, acc0[a]);
        if (NR == 2) storeu(GA + W * K * K + a * K, acc1[a]);
      } else {
        storen(GA + a * K, acc0[a], K);
        if (NR == 2) storen(GA + W * K * K + a * K, acc1[a], K);
      }
    }
  }

  // Every pixel of the group rows [i_begin, i_end), walked in row pairs.  G / V / GA: the group's
  // grad_out, value and gattn; SJ: window start of every column.
  static void rows(const T* G, const T* V, T* GA, const Geo& g, const int64_t* sj,
                   int64_t i_begin, int64_t i_end) {
    if constexpr (kFits) {
      const int64_t HW = g.HW();
      for (int64_t i = i_begin; i < i_end; i += 2) {
        const int nrows = (int)std::min<int64_t>(2, i_end - i);
        const int64_t s0 = window_start(i, g.H, K);
        const bool s1 = nrows == 2 && window_start(i + 1, g.H, K) > s0;
        for (int64_t j = 0; j < g.W; ++j) {
          const T* gp = G + i * g.W + j;
          const T* vr = V + s0 * g.W + sj[j];
          T* ga = GA + (i * g.W + j) * K * K;
          if (nrows == 1) pixel<0, 1>(gp, vr, ga, g.W, HW, g.D);
          else if (!s1) pixel<0, 2>(gp, vr, ga, g.W, HW, g.D);
          else pixel<1, 2>(gp, vr, ga, g.W, HW, g.D);
        }
      }
    }
  }
};

// Where GattnPm runs instead of the tiles (which compute tap-major, L pixels per vector, into a
// scratch transposed afterwards): the compiled k that fit its registers, and only where its K
// lanes of L beat the tiles' lane use (W of ceil(W / L) * L) by more than half, i.e.
// 2K * ceil(W / L) > W.  That rule comes from bare-kernel A/Bs on the AMD EPYC VM (two threads,
// 2026-11-29): GattnPm 1.3-1.5x faster at k = 9..13 on detection maps and 14x14, 1.6-2.0x on
// 7x7 (k = 5 / 7) and 1.14x on 12x12 k = 7; slower where the rule says tiles: 0.72-0.78x at
// k = 5 on 14- and 42-pixel rows, 0.90-0.93x at k = 7 on 42 and 84 (14x14 k = 7: equal).
template <typename T>
inline bool gattn_pm_fits(const Geo& g) {
  constexpr int L = lanes<T>();
  return compiled_k(g.k) && gattn_pm_compiled<T>(g.k) && 2 * g.k * ((g.W + L - 1) / L) > g.W;
}

template <typename T>
void grad_attn_pm_taps(const T* grad_out, const T* value, T* gattn, const Geo& g,
                       int nthreads) {
  const int64_t HW = g.HW(), T2 = (int64_t)g.k * g.k;
  std::vector<int64_t> sj(g.W);
  for (int64_t j = 0; j < g.W; ++j) sj[j] = window_start(j, g.W, g.k);
  parallel_row_blocks(g, nthreads, [&](int64_t bg, int64_t i_begin, int64_t i_end) {
    const T* G = grad_out + bg * g.D * HW;
    const T* V = value + bg * g.D * HW;
    T* GA = gattn + bg * T2 * HW;
    switch (g.k) {
#define NA2D_GA_CASE(KK) \
  case KK: GattnPm<T, KK>::rows(G, V, GA, g, sj.data(), i_begin, i_end); break;
      NA2D_GA_CASE(3) NA2D_GA_CASE(5) NA2D_GA_CASE(7) NA2D_GA_CASE(9) NA2D_GA_CASE(11)
      NA2D_GA_CASE(13)
#undef NA2D_GA_CASE
      default: break;
    }
  });
}

// VP [BG][D][H][WP] <- value with every row padded by WP - W zeros: what the tiles read (their
// whole-vector loads from a clamped window start never leave a row).  Made here, by the pool,
// rather than by the caller: a PyTorch op would wake PyTorch's own sleeping OpenMP threads,
// ~0.1 ms per call on the 2-vCPU VM with OMP_WAIT_POLICY=PASSIVE.
template <typename T>
void pad_rows(const T* value, T* vp, const Geo& g, int64_t WP, int nthreads) {
  const int64_t rows = g.D * g.H;
  parallel_for(g.BG, nthreads, [&](int64_t bg, int) {
    const T* src = value + bg * rows * g.W;
    T* dst = vp + bg * rows * WP;
    for (int64_t row = 0; row < rows; ++row) {
      std::memcpy(dst + row * WP, src + row * g.W, sizeof(T) * g.W);
      std::memset(dst + row * WP + g.W, 0, sizeof(T) * (WP - g.W));
    }
  });
}

// PM: gattn pixel-major.  GattnPm where it fits, else the tiles, which then write each row pair
// tap-major into a per-thread scratch (~110 KB at k = 13, W = 84: it stays in L2), transposed
// into gattn afterwards.  VP: a buffer for the tiles' padded copy of value (pad_rows; WP = W +
// lanes), not touched where GattnPm runs.
template <typename T>
void grad_attn_impl(const T* grad_out, const T* value, T* vp, T* gattn, const Geo& g,
                    int64_t WP, int nthreads, bool pm) {
  if (pm && gattn_pm_fits<T>(g)) return grad_attn_pm_taps<T>(grad_out, value, gattn, g, nthreads);
  pad_rows<T>(value, vp, g, WP, nthreads);
  const int64_t HW = g.HW(), HWP = g.H * WP, T2 = (int64_t)g.k * g.k;
  std::vector<RowTile> tiles;
  std::vector<IVec<T>> idx;
  const int n = plan_tiles<T>(g, tiles, idx);
  const auto chunks = channel_chunks(g.D);
  parallel_row_blocks(g, nthreads, [&](int64_t bg, int64_t i_begin, int64_t i_end) {
    const T* G = grad_out + bg * g.D * HW;
    const T* V = vp + bg * g.D * HWP;
    T* GA = gattn + bg * T2 * HW;
    // what the tiles write: gattn itself (plane stride HW), or the row pair's scratch (2 * W)
    T* sc = pm ? thread_scratch<T, 2>(T2 * 2 * g.W, false) : nullptr;
    const int64_t HWA = pm ? 2 * g.W : HW;
    for (int64_t i = i_begin; i < i_end; i += 2) {
      const int nrows = (int)std::min<int64_t>(2, i_end - i);
      const int64_t s0 = window_start(i, g.H, g.k);
      const int64_t s1 = nrows == 2 ? window_start(i + 1, g.H, g.k) : s0;
      T* dst = pm ? sc : GA + i * g.W;
      for (size_t t = 0; t < tiles.size(); ++t) {
        const RowTile& tile = tiles[t];
        T* pf = pm ? nullptr
                : t + 1 < tiles.size() ? GA + i * g.W + tiles[t + 1].j0
                : i + 2 < i_end ? GA + (i + 2) * g.W + tiles[0].j0 : nullptr;
        bool first = true;
        for (auto& ch : chunks) {
          const T* gp = G + ch.first * HW + i * g.W + tile.j0;
          const T* vr = V + ch.first * HWP + tile.s;
          T* ga = dst + tile.j0;
          T* p = first ? pf : (T*)nullptr;
          dispatch_tile<T, GattnChunk>(ch.second, tile.mode, gp, vr, ga, HW, HWA, g.W, HWP, WP,
                                       g.k, nrows, s0, s1, p, first, idx[t], n);
          first = false;
        }
      }
      if (pm) store_pixel_major<T>(sc, GA + i * g.W * T2, g.W, T2, nrows);
    }
  });
}

// Border columns of grad_value: the r pixels j0..j0+r-1 of one side share one window, so their
// tap b lands on source column b of that window for every pixel.  Per row i that uses source
// row p_u, the block attn[a*k+b][i][j] of taps b0..b0+nb-1 and pixels j0..j0+nq-1 (nb, nq <=
// lanes) is loaded row by row and transposed in registers (taps along the lanes), then each
// pixel's taps times its grad_out, broadcast per channel, accumulate in DC registers.  (A
// scalar loop here cost more than all interior columns at detection sizes; classification
// maps -- 14 columns, r = 6 -- are nearly all border.)  The caller walks taps and pixels in
// blocks of `lanes` (one block each unless k > lanes).  ROW -> gvalue[c0][p_u][window start].
// PM: attn pixel-major, where a pixel's taps are already consecutive (no transpose).
template <typename T, int DC>
struct GvalueBorder {
  static void run(const T* A, const T* G, T* row, const unsigned char* valid, int bit,
                  int64_t ilo, int ni, int64_t p_u, int64_t j0, int nq, int b0, int nb,
                  const Geo& g, bool pm) {
    constexpr int L = lanes<T>();
    const int k = g.k;
    const int64_t HW = g.HW();
    Vec<T> acc[DC] = {};
    for (int ii = 0; ii < ni; ++ii) {
      if (!(valid[ii] & bit)) continue;
      const int64_t i = ilo + ii, a = p_u - window_start(i, g.H, k);
      Vec<T> m[L];
      if (pm) {
        const int64_t T2 = (int64_t)k * k;
        const T* src = A + (i * g.W + j0) * T2 + a * k + b0;
        for (int jj = 0; jj < L; ++jj) m[jj] = jj < nq ? loadn(src + jj * T2, nb) : Vec<T>{};
      } else {
        const T* src = A + (a * k + b0) * HW + i * g.W + j0;
#pragma GCC unroll 16
        for (int b = 0; b < L; ++b) m[b] = b < nb ? loadn(src + b * HW, nq) : Vec<T>{};
        transpose<T>(m);
      }
      const T* gp = G + i * g.W + j0;
      for (int jj = 0; jj < nq; ++jj)
#pragma GCC unroll 16
        for (int c = 0; c < DC; ++c) acc[c] += m[jj] * gp[c * HW + jj];
    }
#pragma GCC unroll 16
    for (int c = 0; c < DC; ++c) {
      T* q = row + c * HW + b0;
      storen(q, loadn(q, nb) + acc[c], nb);
    }
  }
};

// Pixel-major attention: grad_value like the forward, vectorised over channels (a *scatter*
// into a channels-last scratch of the group, GVT [NV][H][W][L], transposed into gvalue at the
// end).  Pixel (i, j) adds attn[i][j][a * K + b] * grad_out[i][j] to source pixel
// (s(i) + a, s(j) + b).  Rows i are walked in order, each in blocks of P source columns q0 + p
// (P as in the forward, gvalue_block_width);
// for every tap row a, the block's P accumulator vectors of source row s(i) + a are loaded,
// get the taps of the interior pixels j = q0 - r + x (s(j) = j - r: to accumulator
// p = x + b - 2r) and are stored back.  A pixel's taps are consecutive in pixel-major memory
// and a block's pixels are one run of (P + K - 1) * K * K elements: read K times (once per tap
// row; it stays in L1), streamed from memory once and prefetched a K-th per tap row, like the
// forward's taps.  Each weight is a scalar broadcast folded into its FMA, and each grad_out
// vector (GT: a channels-last copy) feeds up to K FMAs.  The r border pixels on each side of
// a row (one shared, clamped window) follow the row's blocks while its taps are still cached.
// Measured against the gather (GvalueChunk after fill_taps_pixel_major, which transposes every
// tap into a scratch row) on the AMD EPYC VM, two threads: 2.7-3.5x faster at the k = 13
// detection map, 1.75-2.6x at k = 5 and 7 (docs/performance.md).  Two intermediate forms were
// slower: accumulators of one source row kept in registers over all rows i (each row's taps
// read K times, K * K elements apart: 3.0-3.7x the forward's time, one thread, 8 groups), and
// the border pixels added in a second pass by GvalueBorder (their taps read back from memory:
// +40 % at k = 13, 8 groups).
template <typename T, int K, int P>
struct GvalueBlock {
  static constexpr int L = lanes<T>(), R = K / 2, NX = P + K - 1, T2 = K * K;

  // One tap row: DST -> GVT[cv][s(i) + a][q0] (the block's accumulators), PK -> attn[i][q0 -
  // r][a * K], GT -> GT[cv][i][q0 - r] (pixel x at x * L).  EDGE: only pixels xlo <= x < xhi
  // are interior (the others are border pixels, see borders, or lie off the map), and columns
  // p < pmin belong to the block before (the last block of a row is shifted left to end at W):
  // neither loaded nor stored.  Not inlined: in a function of its own the compiler keeps the
  // accumulators in registers and folds every broadcast into its FMA (inlined, it spilled).
  template <bool EDGE>
  __attribute__((noinline)) static void row(T* __restrict dst, const T* __restrict pk,
                                            const T* __restrict gt, int xlo, int xhi,
                                            int pmin) {
    Vec<T> acc[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p] = !EDGE || p >= pmin ? loadu(dst + p * L) : Vec<T>{};
#pragma GCC unroll 64
    for (int x = 0; x < NX; ++x) {
      if (EDGE && (x < xlo || x >= xhi)) continue;
      const Vec<T> gv = in_register<T>(loadu(gt + x * L));
#pragma GCC unroll 64
      for (int p = 0; p < P; ++p) {
        const int b = p - x + 2 * R;
        if (b >= 0 && b < K) acc[p] += pk[x * T2 + b] * gv;
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
      if (!EDGE || p >= pmin) storeu(dst + p * L, acc[p]);
  }

  // Every tap row of one block: PK -> attn[i][q0 - r][0], ACC -> GVT[cv][s(i)][q0], WL = W * L
  // (its row stride).  PF: PF_LINES cache lines of the next block's taps, prefetched a K-th per
  // tap row.
  template <bool EDGE>
  static void block(const T* pk, const T* gt, T* accp, int64_t WL, int xlo, int xhi, int pmin,
                    const char* pf, int pf_lines) {
    for (int a = 0; a < K; ++a) {
      if (pf)
        for (int l = a * pf_lines / K; l < (a + 1) * pf_lines / K; ++l)
          __builtin_prefetch(pf + l * 64, 0, 1);
      row<EDGE>(accp + a * WL, pk + a * K, gt, xlo, xhi, pmin);
    }
  }

  // The r border pixels on each side of row i share one window (starting at column 0, or at
  // W - K): its K x K taps in turn, each the sum over those pixels.  A -> attn[i][0][0],
  // GT -> GT[cv][i][0], ACC -> GVT[cv][s(i)][0].
  static void borders(const T* A, const T* gt, T* accp, int64_t W, int64_t WL) {
    for (int side = 0; side < 2; ++side) {
      const int64_t j0 = side ? W - R : 0, x0 = side ? W - K : 0;
      Vec<T> gv[R];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) gv[j] = loadu(gt + (j0 + j) * L);
      const T* pk = A + j0 * T2;
      for (int a = 0; a < K; ++a) {
        T* dst = accp + a * WL + x0 * L;
#pragma GCC unroll 16
        for (int b = 0; b < K; ++b) {
          Vec<T> acc = loadu(dst + b * L);
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) acc += pk[j * T2 + a * K + b] * gv[j];
          storeu(dst + b * L, acc);
        }
      }
    }
  }

  static void run(const T* pk, const T* gt, T* accp, int64_t WL, int xlo, int xhi, int pmin,
                  const char* pf, int pf_lines) {
    if (xlo > 0 || xhi < NX || pmin > 0)
      block<true>(pk, gt, accp, WL, xlo, xhi, pmin, pf, pf_lines);
    else
      block<false>(pk, gt, accp, WL, xlo, xhi, pmin, pf, pf_lines);
  }
};

// Block width of GvalueBlock for a row of W: of kPix and kPixAlt the width computing the fewest
// columns (ties: kPix); on rows narrower than both, of the narrow widths (the forward's, 8 and
// 4: 7x7 classification maps) likewise; 0 where k has no compiled kernel (then the gather runs).
inline int gvalue_block_width(const Geo& g) {
  if (!compiled_k(g.k)) return 0;
  auto pick = [&](std::initializer_list<int> widths) {
    int best = 0;
    int64_t best_px = -1;
    for (int P : widths) {
      if (g.W < P) continue;
      const int64_t px = (g.W + P - 1) / P * P;
      if (best_px < 0 || px < best_px) best = P, best_px = px;
    }
    return best;
  };
  const int wide = pick({kPix, kPixAlt});
  return wide ? wide : pick({kPixNarrow[0], kPixNarrow[1]});
}

template <typename T, int P>
void gvalue_block(int k, const T* pk, const T* gt, T* accp, int64_t WL, int xlo, int xhi,
                  int pmin, const char* pf, int pf_lines) {
  switch (k) {
#define NA2D_GV_CASE(KK) \
  case KK: GvalueBlock<T, KK, P>::run(pk, gt, accp, WL, xlo, xhi, pmin, pf, pf_lines); break;
    NA2D_GV_CASE(3) NA2D_GV_CASE(5) NA2D_GV_CASE(7) NA2D_GV_CASE(9) NA2D_GV_CASE(11)
    NA2D_GV_CASE(13)
#undef NA2D_GV_CASE
    default: break;
  }
}

template <typename T>
void gvalue_borders(int k, const T* A, const T* gt, T* accp, int64_t W, int64_t WL) {
  switch (k) {
#define NA2D_GV_CASE(KK) \
  case KK: GvalueBlock<T, KK, kPix>::borders(A, gt, accp, W, WL); break;
    NA2D_GV_CASE(3) NA2D_GV_CASE(5) NA2D_GV_CASE(7) NA2D_GV_CASE(9) NA2D_GV_CASE(11)
    NA2D_GV_CASE(13)
#undef NA2D_GV_CASE
    default: break;
  }
}

// GV[c][h][w] <- GVT[c / L][h][w][c % L] for c < D: the inverse of to_channels_last.
template <typename T>
void from_channels_last(const T* GVT, T* GV, const Geo& g) {
  constexpr int L = lanes<T>();
  const int64_t HW = g.HW(), NV = (g.D + L - 1) / L;
  Vec<T> m[L];
  for (int64_t cv = 0; cv < NV; ++cv) {
    const int nc = (int)std::min<int64_t>(L, g.D - cv * L);
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w0 = 0; w0 < g.W; w0 += L) {
        const int n = (int)std::min<int64_t>(L, g.W - w0);
        const T* src = GVT + ((cv * g.H + h) * g.W + w0) * L;
        for (int p = 0; p < L; ++p) m[p] = p < n ? loadu(src + p * L) : Vec<T>{};
        transpose<T>(m);
        T* dst = GV + cv * L * HW + h * g.W + w0;
        for (int c = 0; c < nc; ++c) {
          if (n == L) storeu(dst + c * HW, m[c]);
          else storen(dst + c * HW, m[c], n);
        }
      }
  }
}

// DST[b * WG + x] = SRC[x * T2 + b] for the k taps b of nx pixels x (one tap row of a pixel-major
// attn row): L x L register transposes; stores stop at nx (the scratch's padding stays zero).
template <typename T>
void fill_taps_pixel_major(const T* src, int64_t T2, int k, int64_t nx_all, T* dst, int64_t WG) {
  constexpr int L = lanes<T>();
  Vec<T> m[L];
  for (int64_t x0 = 0; x0 < nx_all; x0 += L) {
    const int nx = (int)std::min<int64_t>(L, nx_all - x0);
    for (int b0 = 0; b0 < k; b0 += L) {
      const int nb = std::min(L, k - b0);
      for (int x = 0; x < L; ++x) m[x] = x < nx ? loadn(src + (x0 + x) * T2 + b0, nb) : Vec<T>{};
      transpose<T>(m);
      for (int b = 0; b < nb; ++b) {
        if (nx == L) storeu(dst + (b0 + b) * WG + x0, m[b]);
        else storen(dst + (b0 + b) * WG + x0, m[b], nx);
      }
    }
  }
}

// Pixel-major attention where a GvalueBlock fits (block width P): one task per group, whose
// grad_out is copied channels-last once (as the forward copies its value) and whose gradient
// accumulates channels-last (see GvalueBlock).
template <typename T>
void grad_value_blocks(const T* attn, const T* grad_out, T* gvalue, const Geo& g, int P,
                       int nthreads) {
  constexpr int L = lanes<T>();
  const int k = g.k, r = g.r;
  const int64_t HW = g.HW(), T2 = (int64_t)k * k, NV = (g.D + L - 1) / L, WL = g.W * L;
  const int NX = P + k - 1;
  // the blocks of a row: first source column, interior pixels [xlo, xhi), first column owned
  struct GBlock {
    int64_t q0;
    int xlo, xhi, pmin;
  };
  std::vector<GBlock> blocks;
  for (int64_t q = 0; q < g.W; q += P) {
    const int64_t q0 = std::min<int64_t>(q, g.W - P);
    blocks.push_back({q0, (int)std::max<int64_t>(0, 2 * r - q0),
                      (int)std::min<int64_t>(NX, g.W - q0), (int)(q - q0)});
  }
  const int64_t nb = (int64_t)blocks.size();
  parallel_for(g.BG, nthreads, [&](int64_t bg, int) {
    const T* A = attn + bg * T2 * HW;
    const T* G = grad_out + bg * g.D * HW;
    T* GV = gvalue + bg * g.D * HW;
    T* gt = thread_scratch<T, 1>(NV * HW * L, false);
    T* gvt = thread_scratch<T, 2>(NV * HW * L, true);
    to_channels_last<T>(G, gt, g);
    for (int64_t i = 0; i < g.H; ++i) {
      const int64_t s = window_start(i, g.H, k);
      for (int64_t bi = 0; bi < nb; ++bi) {
        const GBlock& blk = blocks[bi];
        const T* pk = A + (i * g.W + blk.q0 - r) * T2;
        // the next block's taps that this one does not read (the next row's first block: all)
        const char* pf = nullptr;
        int pf_lines = 0;
        const int64_t ni = bi + 1 < nb ? i : i + 1;
        if (ni < g.H) {
          const GBlock& nx = blocks[(bi + 1) % nb];
          const T* nk = A + (ni * g.W + nx.q0 - r) * T2;
          const T* lo = nk + nx.xlo * T2;
          const T* hi = nk + nx.xhi * T2;
          if (ni == i) lo = std::max(lo, pk + blk.xhi * T2);
          if (hi > lo) {
            pf = (const char*)lo;
            pf_lines = (int)(((const char*)hi - pf + 63) / 64);
          }
        }
        for (int64_t cv = 0; cv < NV; ++cv) {
          const T* gtr = gt + ((cv * g.H + i) * g.W + blk.q0 - r) * L;
          T* accp = gvt + ((cv * g.H + s) * g.W + blk.q0) * L;
          with_block_width(P, [&](auto w) {
            gvalue_block<T, decltype(w)::value>(k, pk, gtr, accp, WL, blk.xlo, blk.xhi,
                                                blk.pmin, cv ? nullptr : pf, pf_lines);
          });
        }
      }
      for (int64_t cv = 0; cv < NV; ++cv)
        gvalue_borders<T>(k, A + i * g.W * T2, gt + (cv * g.H + i) * g.W * L,
                          gvt + (cv * g.H + s) * g.W * L, g.W, WL);
    }
    from_channels_last<T>(gvt, GV, g);
  });
}

// PM: attn pixel-major; the per-row scratch gets the same tap-major rows, transposed from it in
// L x L register tiles.
template <typename T>
void grad_value_impl(const T* attn, const T* grad_out, const T* gpad, T* gvalue, const Geo& g,
                     int64_t WG, int nthreads, bool pm) {
  if (pm) {
    const int P = gvalue_block_width(g);
    if (P > 0) return grad_value_blocks<T>(attn, grad_out, gvalue, g, P, nthreads);
  }
  constexpr int L = lanes<T>();
  const int k = g.k, r = g.r;
  const int64_t HW = g.HW(), T2 = (int64_t)k * k;
  const int64_t max_rows = std::min<int64_t>(g.H, 2 * (int64_t)k);  // rows feeding a pair
  const auto chunks = channel_chunks(g.D);
  const int64_t blocks = (g.H + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t ntasks = num_tasks(g);
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  const auto border_chunks = channel_chunks(g.D, kMaxChunkF);  // GvalueBorder: one row of acc.
  // Per-thread scratch: padded attention rows for the two source rows (zero outside the
  // interior columns, which are never written), row validity.
  std::vector<std::vector<T>> apad(nt);
  std::vector<std::vector<unsigned char>> valid(nt);
  for (int t = 0; t < nt; ++t) {
    apad[t].assign(2 * max_rows * k * WG, T(0));
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
          if (pm) {
            fill_taps_pixel_major<T>(A + (i * g.W + r) * T2 + a * k, T2, k, nint,
                                     ap[u] + (int64_t)ii * k * WG + 2 * r, WG);
            continue;
          }
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
          with_chunk(ch.second, [&](auto c) {
            GvalueChunk<T, decltype(c)::value>::run((const T*)ap[0], (const T*)ap[1],
                                         (const unsigned char*)vld, GP + ch.first * g.H * WG,
                                         GV + ch.first * HW + p * g.W, g, WG, ilo, ni, np, q0, nq);
          });
      }
      if (r == 0) continue;
      // Border pixels: the r pixels on each side share the window starting at 0 (or W - k);
      // their tap b lands on source column b (or W - k + b).  Left before right: on maps
      // narrower than 2k the two ranges overlap.
      for (int u = 0; u < np; ++u)
        for (int side = 0; side < 2; ++side)
          for (int q0 = 0; q0 < r; q0 += L)
            for (int b0 = 0; b0 < k; b0 += L)
              for (auto& ch : border_chunks)
                with_border_chunk(ch.second, [&](auto c) {
                  GvalueBorder<T, decltype(c)::value>::run(
                      A, G + ch.first * HW,
                      GV + ch.first * HW + (p + u) * g.W + (side ? g.W - k : 0), vld, 1 << u,
                      ilo, ni, p + u, (side ? g.W - r : 0) + q0, std::min(L, r - q0), b0,
                      std::min(L, k - b0), g, pm);
                });
    }
  });
}

}  // namespace

extern "C" {

// Geometry: BG = batch * groups, D channels per group, H x W map, odd k <= min(H, W); pm: attn
// (and grad_attn) pixel-major, [BG][H][W][k*k], else tap-major, [BG][k*k][H][W].  grad_attn's
// vp: uninitialised scratch of BG * D * H * WP elements, WP = W + lanes (filled where needed);
// grad_value's gpad may be null where na2d_grad_value_gathers says it is not read.
#define NA2D_EXPORT(T, SUF)                                                                    \
  int na2d_lanes_##SUF() { return lanes<T>(); }                                               \
  void na2d_forward_##SUF(const T* attn, const T* value, T* out, int64_t BG, int64_t D,     \
                          int64_t H, int64_t W, int k, int pm, int nthreads) {               \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    forward_impl<T>(attn, value, out, g, nthreads, pm != 0);                                 \
  }                                                                                          \
  void na2d_grad_attn_##SUF(const T* grad_out, const T* value, T* vp, T* gattn, int64_t BG,  \
                            int64_t D, int64_t H, int64_t W, int k, int64_t WP, int pm,      \
                            int nthreads) {                                                  \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    grad_attn_impl<T>(grad_out, value, vp, gattn, g, WP, nthreads, pm != 0);                 \
  }                                                                                          \
  void na2d_grad_value_##SUF(const T* attn, const T* grad_out, const T* gpad, T* gvalue,     \
                             int64_t BG, int64_t D, int64_t H, int64_t W, int k, int64_t WG, \
                             int pm, int nthreads) {                                         \
    Geo g{BG, D, H, W, k, k / 2};                                                            \
    grad_value_impl<T>(attn, grad_out, gpad, gvalue, g, WG, nthreads, pm != 0);              \
  }

NA2D_EXPORT(float, f32)
NA2D_EXPORT(double, f64)
#undef NA2D_EXPORT

// Whether na2d_grad_value_* reads `gpad` for a map W wide and kernel k: the gather does, the
// pixel-major scatter (GvalueBlock) does not, and the caller then passes null.
int na2d_grad_value_gathers(int64_t W, int k, int pm) {
  const Geo g{1, 1, k, W, k, k / 2};
  return !(pm && gvalue_block_width(g) > 0);
}

}  // extern "C"
