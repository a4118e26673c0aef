// One float32 SIMD vector for the plain-loop kernels (dwconv_kxk_cpu.cpp, batchnorm_cpu.cpp):
// GCC vector extensions, 16 lanes where the build has AVX-512, else 8 (AVX2; SSE builds split
// them). Unaligned loads and stores through memcpy, which compiles to one vector move.
#pragma once

#include <cstring>

namespace na2d {

#if defined(__AVX512F__)
constexpr int kV = 16;
#else
constexpr int kV = 8;
#endif
typedef float vf __attribute__((vector_size(kV * sizeof(float))));

inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace na2d
