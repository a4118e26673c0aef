// Depthwise K x K convolution, stride 1, any padding and dilation, on NCHW-contiguous float32
// maps: the forward (ops/dwconv.py uses it on large maps) and the weight gradient.
//
//   forward:     out[n][c][i][j] = b[c] + sum_{a,b} w[c][a][b] * x[n][c][i + a dh - ph][j + b dw - pw]
//   grad_weight: gw[c][a][b] = sum_{n,i,j} go[n][c][i][j] * x[n][c][i + a dh - ph][j + b dw - pw]
//   (x is zero outside the map; the input gradient is the forward of go with the flipped kernel)
//
// Why (measured side by side, docs/performance.md): PyTorch's oneDNN computes the weight gradient
// 10-30x slower than the forward; ops/dwconv.py ran it as a convolution of the input with
// grad_out as an H x W kernel, which oneDNN runs at ~130 GFLOP/s at stride 16 but only
// 7-33 GFLOP/s at OverLoCK-T's stride-4 maps (K = 17 / 7 / 5, [1, 64, 200, 336]). oneDNN's
// forward is slow on such large maps too: 20-60 GFLOP/s there in either layout (fast, up to
// ~150 GFLOP/s, at stride 16, where ops/dwconv.py keeps it).
//
// How: GCC vector extensions (AVX-512, AVX2 or SSE as the build allows), vectorised along W.
// Each task copies its plane of x into a zero-bordered per-thread scratch (and grad_out's into
// rows padded to whole vectors with zeros), so the inner loops have no bounds checks and no
// scalar tails.
// - forward: one task per (n, c) plane. An output row is computed in tiles of up to 4 vectors
//   held in registers; each tap adds its weight times the 4 shifted input vectors.
// - grad_weight: one task per channel (it sums the N planes), so no two tasks write the same
//   weights. For each pair (output row i, kernel row a) the input row r = i + a dh - ph is read
//   once per block of up to 8 kernel columns: one vector of grad_out times the block's 8
//   shifted vectors of x, 8 independent accumulators.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_pool.h"
#include "vec_f32.h"

namespace {

using na2d::kV;
using na2d::loadu;
using na2d::storeu;
using na2d::vf;

// dst [rows][wd] <- src [rows][w] shifted right by `left` columns, zeros around it (every element
// written: the thread's scratch needs no clearing).  wd >= left + w.
inline void pad_plane(const float* src, int64_t rows, int64_t w, int64_t left, int64_t wd,
                      float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * wd;
    std::memset(d, 0, sizeof(float) * left);
    std::memcpy(d + left, src + r * w, sizeof(float) * w);
    std::memset(d + left + w, 0, sizeof(float) * (wd - left - w));
  }
}

// per-thread scratch slots (thread_pool.h); na2d_cpu.cpp's kernels use 0-2
enum Slot { kPlane = 8, kGradPlane, kRows, kTail };

// ---------------------------------------------------------------------------------- forward
// out[0 .. NJ kV) = bias + sum over kernel rows a (rows[a] null: outside the map) and columns b
// of w[a][b] * rows[a][b dx ..]
template <int NJ>
inline void forward_tile(const float* const* rows, int64_t kh, const float* w, int64_t kw,
                         int64_t dx, float bias, float* out) {
  vf s[NJ];
  for (int t = 0; t < NJ; ++t) s[t] = vf{} + bias;
  for (int64_t a = 0; a < kh; ++a) {
    const float* r = rows[a];
    if (!r) continue;
    const float* wa = w + a * kw;
    for (int64_t b = 0; b < kw; ++b) {
      const vf wv = vf{} + wa[b];
      const float* rb = r + b * dx;
      for (int t = 0; t < NJ; ++t) s[t] += wv * loadu(rb + t * kV);
    }
  }
  for (int t = 0; t < NJ; ++t) storeu(out + t * kV, s[t]);
}

constexpr int kTile = 4;  // vectors per forward tile: 4 accumulators + the weight + a load

inline void forward_tile_n(int nv, const float* const* rows, int64_t kh, const float* w,
                           int64_t kw, int64_t dx, float bias, float* out) {
  switch (nv) {
    case 1: forward_tile<1>(rows, kh, w, kw, dx, bias, out); break;
    case 2: forward_tile<2>(rows, kh, w, kw, dx, bias, out); break;
    case 3: forward_tile<3>(rows, kh, w, kw, dx, bias, out); break;
    default: forward_tile<kTile>(rows, kh, w, kw, dx, bias, out); break;
  }
}

// ----------------------------------------------------------------------------- grad_weight
// acc[k] += sum over j in [0, wg) step kV of g[j..] * x[j + k * dx ..], k < NB
template <int NB>
inline void block(const float* __restrict g, const float* __restrict x, int64_t dx, int64_t wg,
                  vf* __restrict acc) {
  vf s[NB];
  for (int k = 0; k < NB; ++k) s[k] = vf{};
  for (int64_t j = 0; j < wg; j += kV) {
    const vf gv = loadu(g + j);
    for (int k = 0; k < NB; ++k) s[k] += gv * loadu(x + j + k * dx);
  }
  for (int k = 0; k < NB; ++k) acc[k] += s[k];
}

inline void block_n(int nb, const float* g, const float* x, int64_t dx, int64_t wg, vf* acc) {
  switch (nb) {
    case 1: block<1>(g, x, dx, wg, acc); break;
    case 2: block<2>(g, x, dx, wg, acc); break;
    case 3: block<3>(g, x, dx, wg, acc); break;
    case 4: block<4>(g, x, dx, wg, acc); break;
    case 5: block<5>(g, x, dx, wg, acc); break;
    case 6: block<6>(g, x, dx, wg, acc); break;
    case 7: block<7>(g, x, dx, wg, acc); break;
    default: block<8>(g, x, dx, wg, acc); break;
  }
}

}  // namespace

extern "C" {

// x [N][C][H][W], w [C][kh][kw], b [C] or null -> out [N][C][Ho][Wo]; stride 1, padding
// (ph, pw), dilation (dh, dw), Ho, Wo the output size.
void dw_forward_f32(const float* x, const float* w, const float* b, float* out, int64_t N,
                    int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh,
                    int64_t kw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int nthreads) {
  const int64_t tile = kTile * kV;
  // x row from column -pw, zero outside [0, W); wide enough for the last tile's reads
  const int64_t wx = (Wo + kV - 1) / kV * kV + tile + (kw - 1) * dw;
  na2d::parallel_for(N * C, nthreads, [&](int64_t p, int) {
    float* xb = na2d::thread_scratch<float, kPlane>(H * wx, false);
    const float** rows = na2d::thread_scratch<const float*, kRows>(kh, false);
    float* tail = na2d::thread_scratch<float, kTail>(tile, false);
    pad_plane(x + p * H * W, H, W, pw, wx, xb);
    const int64_t c = p % C;
    const float* wc = w + c * kh * kw;
    const float bc = b ? b[c] : 0.f;
    for (int64_t i = 0; i < Ho; ++i) {
      float* o = out + (p * Ho + i) * Wo;
      for (int64_t j = 0; j < Wo; j += tile) {
        for (int64_t a = 0; a < kh; ++a) {
          const int64_t r = i + a * dh - ph;
          rows[a] = (r >= 0 && r < H) ? xb + r * wx + j : nullptr;
        }
        if (j + tile <= Wo) {
          forward_tile<kTile>(rows, kh, wc, kw, dw, bc, o + j);
        } else {  // the row's rest: whole vectors into a scratch row, then its first Wo - j
          forward_tile_n((int)((Wo - j + kV - 1) / kV), rows, kh, wc, kw, dw, bc, tail);
          std::memcpy(o + j, tail, (Wo - j) * 4);
        }
      }
    }
  });
}

// x [N][C][H][W], go [N][C][Ho][Wo] -> gw [C][kh][kw]; stride 1, padding (ph, pw), dilation
// (dh, dw); Ho, Wo the forward's output size.
void dw_grad_weight_f32(const float* x, const float* go, float* gw, int64_t N, int64_t C,
                        int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw,
                        int64_t ph, int64_t pw, int64_t dh, int64_t dw, int nthreads) {
  const int64_t wg = (Wo + kV - 1) / kV * kV;  // grad_out row, padded to whole vectors
  const int64_t wx = wg + (kw - 1) * dw;       // x row from column -pw, zero outside [0, W)
  // kernel columns in blocks of at most 8, as even as possible (17 -> 6, 6, 5)
  const int64_t nblocks = (kw + 7) / 8, per = (kw + nblocks - 1) / nblocks;
  na2d::parallel_for(C, nthreads, [&](int64_t c, int) {
    float* xb = na2d::thread_scratch<float, kPlane>(H * wx, false);
    float* gb = na2d::thread_scratch<float, kGradPlane>(Ho * wg, false);
    // the accumulators per task, not in a thread scratch slot: there the k = 13 / 15 cases ran
    // 8-13 % slower (A/B on the 2-vCPU VM; likely cache-set conflicts with the planes)
    std::vector<vf> acc_buf(kh * kw, vf{});
    vf* acc = acc_buf.data();
    for (int64_t n = 0; n < N; ++n) {
      pad_plane(x + (n * C + c) * H * W, H, W, pw, wx, xb);
      pad_plane(go + (n * C + c) * Ho * Wo, Ho, Wo, 0, wg, gb);
      for (int64_t i = 0; i < Ho; ++i) {
        const float* g = gb + i * wg;
        for (int64_t a = 0; a < kh; ++a) {
          const int64_t r = i + a * dh - ph;
          if (r < 0 || r >= H) continue;
          const float* xr = xb + r * wx;
          for (int64_t b0 = 0; b0 < kw; b0 += per) {
            const int nb = (int)std::min(per, kw - b0);
            block_n(nb, g, xr + b0 * dw, dw, wg, acc + a * kw + b0);
          }
        }
      }
    }
    for (int64_t t = 0; t < kh * kw; ++t) {
      float s = 0.f;
      for (int l = 0; l < kV; ++l) s += acc[t][l];
      gw[c * kh * kw + t] = s;
    }
  });
}

}  // extern "C"
