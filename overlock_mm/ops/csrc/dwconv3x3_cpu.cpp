// Depthwise 3x3 convolution (stride 1, padding 1, no dilation) on NCHW-contiguous float32 maps.
//
// Why: oneDNN's NCHW depthwise 3x3 is far from memory speed on the project's CPU -- ~80-90 ms
// forward and ~140 ms backward at OverLoCK-T's stage-1 MLP map [1, 256, 200, 336], whose
// 69 MB in and out move in a few ms (ops/dwconv.py, docs/performance.md).  These are plain
// loops over one (n, c) plane per task: each output row is three input rows times three taps,
// written so that GCC vectorises along W (the 16-lane inner loops below).
//
//   forward:     out[i][j] = b + sum_{a,b} w[a][b] * x[i + a - 1][j + b - 1]   (zero outside)
//   grad_input:  the forward of grad_out with the kernel flipped (the caller flips it)
//   grad_weight: gw[a][b] = sum_{n,i,j} go[i][j] * x[i + a - 1][j + b - 1]; one task per
//                channel sums its N planes, so no two tasks write the same weights.
//
// Called through ctypes from ../na2d_cpu.py's library (built together with na2d_cpu.cpp).
#include <cstdint>
#include <cstring>

#include "thread_pool.h"

namespace {

constexpr int kLanes = 16;

// One output row: acc[j] = bias + sum over the three taps of each of up to three input rows
// (rows[a] null where row i + a - 1 is outside the map).
inline void row3x3(const float* const rows[3], const float* w, float bias, float* out,
                   int64_t W) {
  for (int64_t j = 0; j < W; ++j) out[j] = bias;
  for (int a = 0; a < 3; ++a) {
    const float* __restrict r = rows[a];
    if (!r) continue;
    const float w0 = w[3 * a], w1 = w[3 * a + 1], w2 = w[3 * a + 2];
    float* __restrict o = out;
    // interior columns 1 .. W - 2 read j - 1, j, j + 1: one vectorised loop
    for (int64_t j = 1; j < W - 1; ++j) o[j] += w0 * r[j - 1] + w1 * r[j] + w2 * r[j + 1];
    if (W == 1) {
      o[0] += w1 * r[0];
    } else {
      o[0] += w1 * r[0] + w2 * r[1];
      o[W - 1] += w0 * r[W - 2] + w1 * r[W - 1];
    }
  }
}

void forward_plane(const float* x, const float* w, float bias, float* out, int64_t H,
                   int64_t W) {
  for (int64_t i = 0; i < H; ++i) {
    const float* rows[3] = {i > 0 ? x + (i - 1) * W : nullptr, x + i * W,
                            i + 1 < H ? x + (i + 1) * W : nullptr};
    row3x3(rows, w, bias, out + i * W, W);
  }
}

// acc[t][l] += sum over j = l (mod kLanes) of g[j] * r[j + t - 1], t = 0, 1, 2, for the columns
// where r[j + t - 1] exists; lane-wise accumulators keep the loops vectorised without
// reassociating a float sum (which GCC only does under -ffast-math).
inline void row_dots(const float* __restrict g, const float* __restrict r, int64_t W,
                     float acc[3][kLanes]) {
  // tap column 1 (j + 0): every j
  // tap column 0 (j - 1): j >= 1;  tap column 2 (j + 1): j <= W - 2
  int64_t j = 0;
  for (; j + kLanes <= W; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[1][l] += g[j + l] * r[j + l];
  for (; j < W; ++j) acc[1][j % kLanes] += g[j] * r[j];
  j = 1;
  for (; j + kLanes <= W; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[0][l] += g[j + l] * r[j + l - 1];
  for (; j < W; ++j) acc[0][j % kLanes] += g[j] * r[j - 1];
  j = 0;
  for (; j + kLanes <= W - 1; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[2][l] += g[j + l] * r[j + l + 1];
  for (; j < W - 1; ++j) acc[2][j % kLanes] += g[j] * r[j + 1];
}

}  // namespace

extern "C" {

// x, out [N][C][H][W]; w [C][3][3]; b [C] or null.
void dw3x3_forward_f32(const float* x, const float* w, const float* b, float* out, int64_t N,
                       int64_t C, int64_t H, int64_t W, int nthreads) {
  const int64_t HW = H * W;
  na2d::parallel_for(N * C, nthreads, [&](int64_t p, int) {
    const int64_t c = p % C;
    forward_plane(x + p * HW, w + 9 * c, b ? b[c] : 0.f, out + p * HW, H, W);
  });
}

// gw [C][3][3] <- sum over n, i, j of go[n][c][i][j] * x[n][c][i + a - 1][j + b - 1].
void dw3x3_grad_weight_f32(const float* x, const float* go, float* gw, int64_t N, int64_t C,
                           int64_t H, int64_t W, int nthreads) {
  const int64_t HW = H * W;
  na2d::parallel_for(C, nthreads, [&](int64_t c, int) {
    float acc[3][3][kLanes];
    std::memset(acc, 0, sizeof(acc));
    for (int64_t n = 0; n < N; ++n) {
      const float* xp = x + (n * C + c) * HW;
      const float* gp = go + (n * C + c) * HW;
      for (int64_t i = 0; i < H; ++i) {
        // output row i reads input row i + a - 1 with tap row a
        for (int a = 0; a < 3; ++a) {
          const int64_t r = i + a - 1;
          if (r < 0 || r >= H) continue;
          row_dots(gp + i * W, xp + r * W, W, acc[a]);
        }
      }
    }
    for (int a = 0; a < 3; ++a)
      for (int t = 0; t < 3; ++t) {
        float s = 0.f;
        for (int l = 0; l < kLanes; ++l) s += acc[a][t][l];
        gw[9 * c + 3 * a + t] = s;
      }
  });
}

}  // extern "C"
