// BatchNorm's training forward (batch statistics) and backward on NCHW-contiguous float32 maps
// (ops/batchnorm.py).
//
//   forward:  mean[c], var[c] (biased) over N x H x W;  y = (x - mean) / sqrt(var + eps) * w + b
//   backward: gx = w / s * (gy - mean(gy) - xhat * mean(gy * xhat)),  s = sqrt(var + eps),
//             gw[c] = sum(gy * xhat),  gb[c] = sum(gy)            (xhat = (x - mean) / s)
//
// Why (measured side by side, docs/performance.md): PyTorch's CPU kernels took 4.9 ms forward
// and 5.1 ms backward at OverLoCK-T's stage-1 map [1, 64, 200, 336], where a copy of it takes
// ~0.7 ms; the dilated re-parameterisation blocks run five to seven of them per block.
//
// How: one task per channel. Its planes (H x W floats each) are read once for the sums and again
// for the output, the second time mostly from the core's L2 cache at these sizes. Sums run in
// float vector lanes over blocks of 4096 elements and in double across blocks; the forward sums
// x - x[first] (shifted data), so a large mean does not swamp the variance.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "thread_pool.h"
#include "vec_f32.h"

namespace {

using na2d::kV;
using na2d::loadu;
using na2d::storeu;
using na2d::vf;
constexpr int64_t kBlock = 4096;

inline double hsum(vf v) {
  double s = 0;
  for (int i = 0; i < kV; ++i) s += v[i];
  return s;
}

// s1 += sum(u), s2 += sum(u * (p - s)) over n elements, where u = p - s (kSelf: the forward's
// shifted sums) or u = g (the backward's sums of grad_out and grad_out * (x - mean))
template <bool kSelf>
void block_sums(const float* g, const float* p, int64_t n, float s, double& s1, double& s2) {
  const vf vs = vf{} + s;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t e = std::min(n, b0 + kBlock);
    vf a0 = {}, a1 = {}, q0 = {}, q1 = {};
    int64_t i = b0;
    for (; i + 2 * kV <= e; i += 2 * kV) {
      const vf d0 = loadu(p + i) - vs, d1 = loadu(p + i + kV) - vs;
      const vf u0 = kSelf ? d0 : loadu(g + i), u1 = kSelf ? d1 : loadu(g + i + kV);
      a0 += u0;
      a1 += u1;
      q0 += u0 * d0;
      q1 += u1 * d1;
    }
    double t1 = hsum(a0 + a1), t2 = hsum(q0 + q1);
    for (; i < e; ++i) {
      const double d = double(p[i]) - s, u = kSelf ? d : double(g[i]);
      t1 += u;
      t2 += u * d;
    }
    s1 += t1;
    s2 += t2;
  }
}

}  // namespace

extern "C" {

// y; mean, biased var and 1 / sqrt(var + eps) [C]; w, b may be null (1, 0)
void bn_forward_f32(const float* x, const float* w, const float* b, float* y, float* mean_out,
                    float* var_out, float* invstd_out, int64_t N, int64_t C, int64_t HW,
                    double eps, int nthreads) {
  na2d::parallel_for(C, nthreads, [&](int64_t c, int) {
    const float shift = x[c * HW];
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < N; ++n)
      block_sums<true>(nullptr, x + (n * C + c) * HW, HW, shift, s1, s2);
    const double count = double(N) * double(HW);
    const double m = s1 / count;
    const double var = std::max(s2 / count - m * m, 0.0);
    const double mean = shift + m;
    const double inv = 1.0 / std::sqrt(var + eps);
    mean_out[c] = float(mean);
    var_out[c] = float(var);
    invstd_out[c] = float(inv);
    const double scale = (w ? w[c] : 1.0) * inv;
    const float sc = float(scale), sh = float((b ? b[c] : 0.0) - mean * scale);
    const vf vsc = vf{} + sc, vsh = vf{} + sh;
    for (int64_t n = 0; n < N; ++n) {
      const float* p = x + (n * C + c) * HW;
      float* q = y + (n * C + c) * HW;
      int64_t i = 0;
      for (; i + kV <= HW; i += kV) storeu(q + i, loadu(p + i) * vsc + vsh);
      for (; i < HW; ++i) q[i] = p[i] * sc + sh;
    }
  });
}

// gx, gw, gb may each be null (not needed); w may be null (1)
void bn_backward_f32(const float* gy, const float* x, const float* w, const float* mean,
                     const float* invstd, float* gx, float* gw, float* gb, int64_t N, int64_t C,
                     int64_t HW, int nthreads) {
  na2d::parallel_for(C, nthreads, [&](int64_t c, int) {
    const float mu = mean[c];
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < N; ++n)
      block_sums<false>(gy + (n * C + c) * HW, x + (n * C + c) * HW, HW, mu, sg, sgx);
    const double inv = invstd[c], count = double(N) * double(HW);
    if (gw) gw[c] = float(sgx * inv);
    if (gb) gb[c] = float(sg);
    if (!gx) return;
    // gx = k1 * gy + k2 * (x - mean) + k0
    const double wc = w ? w[c] : 1.0;
    const float k1 = float(wc * inv), k2 = float(-wc * inv * inv * inv * sgx / count),
                k0 = float(-wc * inv * sg / count);
    const vf v1 = vf{} + k1, v2 = vf{} + k2, v0 = vf{} + k0, vm = vf{} + mu;
    for (int64_t n = 0; n < N; ++n) {
      const float* g = gy + (n * C + c) * HW;
      const float* p = x + (n * C + c) * HW;
      float* q = gx + (n * C + c) * HW;
      int64_t i = 0;
      for (; i + kV <= HW; i += kV) storeu(q + i, loadu(g + i) * v1 + (loadu(p + i) - vm) * v2 + v0);
      for (; i < HW; ++i) q[i] = g[i] * k1 + (p[i] - mu) * k2 + k0;
    }
  });
}

}  // extern "C"
