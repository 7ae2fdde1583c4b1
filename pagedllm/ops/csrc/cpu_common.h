// What the C++ CPU kernels of this folder share: bf16 storage (the raw 16 bits, widened to fp32
// on load and rounded to nearest even on store, as c10::BFloat16 does) and the fixed-order sum
// of a reduction's partial sums. ops/cpu_build.py rebuilds every library when this file changes.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define INLINE inline __attribute__((always_inline))

namespace pagedllm_cpu {

using bf16_bits = uint16_t;

INLINE float to_float(float x) { return x; }
INLINE float to_float(bf16_bits x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

INLINE void store(float* p, float x) { *p = x; }
INLINE void store(bf16_bits* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
  *p = std::isnan(x) ? bf16_bits{0x7fc0} : static_cast<bf16_bits>(rounded);
}

// Tree sum of W partial sums (W a power of two). Reductions keep W independent partials so
// that -O3 vectorizes them without reassociating one running sum (which needs -ffast-math);
// the order is fixed, so the result is too.
template <int W>
INLINE float sum_lanes(float* acc) {
  for (int w = W / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

}  // namespace pagedllm_cpu
