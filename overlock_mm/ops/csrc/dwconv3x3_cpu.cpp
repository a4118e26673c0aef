// Depthwise 3x3 convolution (stride 1, dilation d, padding d: "same") on NCHW-contiguous float32
// maps -- the backbones' plain 3x3 convolutions and the 3x3 branches of the dilated
// re-parameterisable large kernels.
//
// Why: oneDNN's NCHW depthwise 3x3 is far from memory speed on the project's CPU -- ~80-90 ms
// forward and ~140 ms backward at OverLoCK-T's stage-1 MLP map [1, 256, 200, 336], whose
// 69 MB in and out move in a few ms (ops/dwconv.py, docs/performance.md).  These are plain
// loops over one (n, c) plane per task: each output row is three input rows times three taps,
// written so that GCC vectorises along W (the 16-lane inner loops below).
//
//   forward:     out[i][j] = b + sum_{a,b} w[a][b] * x[i + (a-1) d][j + (b-1) d]  (zero outside)
//   residual:    out += x (ResDWConv's x + conv(x)); its input gradient is grad_out + that of
//                the convolution, i.e. again this forward with `residual`
//   grad_input:  the forward of grad_out with the kernel flipped (the caller flips it)
//   grad_weight: gw[a][b] = sum_{n,i,j} go[i][j] * x[i + (a-1) d][j + (b-1) d]; one task per
//                channel sums its N planes, so no two tasks write the same weights.
//
// Called through ctypes from ../na2d_cpu.py's library (built together with na2d_cpu.cpp).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "thread_pool.h"

namespace {

constexpr int kLanes = 16;

// One output row: out[j] = bias (+ the input row itself if `residual`) + sum over the three taps
// of each of up to three input rows (rows[a] null where row i + (a - 1) * d is outside the
// map).  Tap b reads column j + (b - 1) * d: columns [d, W - d) have all three, the others are
// summed with bounds checks.
inline void row3x3(const float* const rows[3], const float* w, float bias, float* out,
                   int64_t W, int64_t d, bool residual) {
  const int64_t lo = std::min(d, W), hi = std::max(W - d, lo);
  if (residual) {
    const float* __restrict x = rows[1];
    for (int64_t j = 0; j < W; ++j) out[j] = bias + x[j];
  } else {
    for (int64_t j = 0; j < W; ++j) out[j] = bias;
  }
  for (int a = 0; a < 3; ++a) {
    const float* __restrict r = rows[a];
    if (!r) continue;
    const float w0 = w[3 * a], w1 = w[3 * a + 1], w2 = w[3 * a + 2];
    float* __restrict o = out;
    for (int64_t j = lo; j < hi; ++j) o[j] += w0 * r[j - d] + w1 * r[j] + w2 * r[j + d];
    auto edge = [&](int64_t j) {
      float s = w1 * r[j];
      if (j - d >= 0) s += w0 * r[j - d];
      if (j + d < W) s += w2 * r[j + d];
      o[j] += s;
    };
    for (int64_t j = 0; j < lo; ++j) edge(j);
    for (int64_t j = hi; j < W; ++j) edge(j);
  }
}

void forward_plane(const float* x, const float* w, float bias, float* out, int64_t H,
                   int64_t W, int64_t d, bool residual) {
  for (int64_t i = 0; i < H; ++i) {
    const float* rows[3] = {i - d >= 0 ? x + (i - d) * W : nullptr, x + i * W,
                            i + d < H ? x + (i + d) * W : nullptr};
    row3x3(rows, w, bias, out + i * W, W, d, residual);
  }
}

// acc[l] += sum over j in [j0, j1), j = l (mod kLanes) of g[j] * r[j + off]: lane-wise
// accumulators keep the loop vectorised without reassociating a float sum (which GCC only does
// under -ffast-math).
inline void dot_lanes(const float* __restrict g, const float* __restrict r, int64_t j0,
                      int64_t j1, int64_t off, float* acc) {
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += g[j + l] * r[j + l + off];
  for (; j < j1; ++j) acc[(j - j0) % kLanes] += g[j] * r[j + off];
}

// The three tap columns of one (output row, input row) pair: offsets -d, 0, +d.
inline void row_dots(const float* g, const float* r, int64_t W, int64_t d,
                     float acc[3][kLanes]) {
  if (d < W) dot_lanes(g, r, d, W, -d, acc[0]);
  dot_lanes(g, r, 0, W, 0, acc[1]);
  if (d < W) dot_lanes(g, r, 0, W - d, d, acc[2]);
}

}  // namespace

extern "C" {

// x, out [N][C][H][W]; w [C][3][3]; b [C] or null; dilation = padding = d; residual: out also
// gets x itself (x + conv(x), ResDWConv), without a separate pass over the map.
void dw3x3_forward_f32(const float* x, const float* w, const float* b, float* out, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t d, int residual, int nthreads) {
  const int64_t HW = H * W;
  na2d::parallel_for(N * C, nthreads, [&](int64_t p, int) {
    const int64_t c = p % C;
    forward_plane(x + p * HW, w + 9 * c, b ? b[c] : 0.f, out + p * HW, H, W, d, residual != 0);
  });
}

// gw [C][3][3] <- sum over n, i, j of go[n][c][i][j] * x[n][c][i + (a - 1) d][j + (b - 1) d].
void dw3x3_grad_weight_f32(const float* x, const float* go, float* gw, int64_t N, int64_t C,
                           int64_t H, int64_t W, int64_t d, int nthreads) {
  const int64_t HW = H * W;
  na2d::parallel_for(C, nthreads, [&](int64_t c, int) {
    float acc[3][3][kLanes];
    std::memset(acc, 0, sizeof(acc));
    for (int64_t n = 0; n < N; ++n) {
      const float* xp = x + (n * C + c) * HW;
      const float* gp = go + (n * C + c) * HW;
      for (int64_t i = 0; i < H; ++i) {
        // output row i reads input row i + (a - 1) d with tap row a
        for (int a = 0; a < 3; ++a) {
          const int64_t r = i + (a - 1) * d;
          if (r < 0 || r >= H) continue;
          row_dots(gp + i * W, xp + r * W, W, d, acc[a]);
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
