// Weight-only quantized linear layers on the CPU: y = x W^T + bias with W stored in blocks of
// 32 weights along K (the input dimension), GGUF's block formats (fp16 scales, as there):
//
//   q8_0  w = d * q          q int8,  one scale d per block            (34 bytes / 32 weights)
//   q4_1  w = d * q + m      q 0..15, a scale d and a minimum m        (20 bytes / 32 weights)
//
// A q4_1 block stores its 32 nibbles in 16 bytes: byte j holds weight j in its low nibble and
// weight j + 16 in its high nibble (GGUF's order), so one 16-byte load widens to two vectors
// of 16 consecutive weights.
//
// Decode at batch 1 is bound by the bytes of weights read per token; these blocks read 3.6x
// (q8_0) and 6.4x (q4_1) fewer bytes than fp32. Each block is de-quantized to fp32 once in
// registers and used for up to R rows of x at a time. Activations and sums are fp32.
//
// Batch invariance: the output (m, n) is the same sequence of operations whatever M is and
// whichever thread computes it (threads split N only; a row tile only shares the de-quantized
// weights), so a row's bits never depend on the batch it came in.
//
// An AVX-512 copy is picked at run time by CPUID; elsewhere the portable loops (the same
// arithmetic per block, another summation order) run. No -march=native: CI machines differ.
// The entry points are plain C, called through ctypes (ops/quant_linear.py; see
// paged_decode_cpu.cpp for why).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#endif

namespace {

constexpr int64_t QK = 32;  // weights per block
constexpr int64_t R = 8;    // rows of x sharing one de-quantized block (at most)

struct Args {
  const float* x;      // [M, K]
  const void* q;       // q8_0: int8 [N, K]; q4_1: uint8 [N, K / 2]
  const uint16_t* d;   // [N, K / 32] fp16
  const uint16_t* m;   // [N, K / 32] fp16 (q4_1) or null
  const float* bias;   // [N] or null
  float* out;          // [M, N]
  int64_t M, N, K;
};

// ---- portable --------------------------------------------------------------------------------
inline float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32, exactly
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // zero
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400) == 0) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One block's 32 weights de-quantized into w.
inline void dequant_block(const Args& a, int64_t n, int64_t b, float* w) {
  const int64_t nb = a.K / QK;
  const float d = half_to_float(a.d[n * nb + b]);
  if (a.m == nullptr) {
    const int8_t* q = static_cast<const int8_t*>(a.q) + n * a.K + b * QK;
    for (int j = 0; j < QK; ++j) w[j] = d * static_cast<float>(q[j]);
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + n * (a.K / 2) + b * (QK / 2);
    const float mn = half_to_float(a.m[n * nb + b]);
    for (int j = 0; j < QK / 2; ++j) {
      w[j] = d * static_cast<float>(q[j] & 0xF) + mn;
      w[j + QK / 2] = d * static_cast<float>(q[j] >> 4) + mn;
    }
  }
}

void range_portable(const Args& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / QK;
  float w[QK];
  // Rows outer, outputs inner: one tile's R x K of x stays in L1 while the weights stream.
  for (int64_t r0 = 0; r0 < a.M; r0 += R)
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t rows = std::min(R, a.M - r0);
      float acc[R][8] = {};
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block(a, n, b, w);
        for (int64_t r = 0; r < rows; ++r) {
          const float* x = a.x + (r0 + r) * a.K + b * QK;
          for (int j = 0; j < QK; ++j) acc[r][j % 8] += w[j] * x[j];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s = 0.f;
        for (int j = 0; j < 8; ++j) s += acc[r][j];
        a.out[(r0 + r) * a.N + n] = s + (a.bias ? a.bias[n] : 0.f);
      }
    }
}

#ifdef HAVE_AVX512_PATH
// ---- AVX-512 ---------------------------------------------------------------------------------
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

// One block's 32 weights, de-quantized: lanes 0-15 and 16-31.
template <bool Q4>
AVX512 INLINE void load_block(const Args& a, int64_t n, int64_t b, __m512& w_lo, __m512& w_hi) {
  const int64_t nb = a.K / QK;
  const __m512 scale = _mm512_set1_ps(_cvtsh_ss(a.d[n * nb + b]));
  if (Q4) {
    const uint8_t* q = static_cast<const uint8_t*>(a.q) + n * (a.K / 2) + b * (QK / 2);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m512 shift = _mm512_set1_ps(_cvtsh_ss(a.m[n * nb + b]));
    w_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))),
                           scale, shift);
    w_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale, shift);
  } else {
    const __m128i* p = reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(a.q) +
                                                        n * a.K + b * QK);
    w_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))), scale);
    w_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1))), scale);
  }
}

// Ask for output n + AHEAD's blocks while n's are summed: a layer's weights come from DRAM
// (a step reads ~100 MB), and the hardware prefetcher alone keeps too few lines in flight for
// rows of a few hundred bytes.
constexpr int64_t AHEAD = 4;

AVX512 INLINE void prefetch_row(const Args& a, int64_t n) {
  if (n >= a.N) return;
  const int64_t nb = a.K / QK, qbytes = a.m ? a.K / 2 : a.K;
  const char* q = static_cast<const char*>(a.q) + n * qbytes;
  for (int64_t off = 0; off < qbytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T0);
  for (int64_t off = 0; off < nb * 2; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(a.d + n * nb) + off, _MM_HINT_T0);
    if (a.m) _mm_prefetch(reinterpret_cast<const char*>(a.m + n * nb) + off, _MM_HINT_T0);
  }
}

// Output n for ROWS rows of x from row r0. ROWS is a compile-time constant so that the
// accumulators live in registers; two per row (a block's low and high 16 weights) make two
// independent FMA chains, so one row alone is not bound by the FMA latency. Each row's
// instructions are the same whatever ROWS is: that is the batch invariance.
template <bool Q4, int ROWS>
AVX512 INLINE void rows_avx512(const Args& a, int64_t n, int64_t r0) {
  prefetch_row(a, n + AHEAD);
  __m512 lo[ROWS], hi[ROWS];
  for (int r = 0; r < ROWS; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.K / QK; ++b) {
    __m512 w_lo, w_hi;
    load_block<Q4>(a, n, b, w_lo, w_hi);
    for (int r = 0; r < ROWS; ++r) {
      const float* x = a.x + (r0 + r) * a.K + b * QK;
      lo[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x), lo[r]);
      hi[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + 16), hi[r]);
    }
  }
  const float bias = a.bias ? a.bias[n] : 0.f;
  for (int r = 0; r < ROWS; ++r)
    a.out[(r0 + r) * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r])) + bias;
}

template <bool Q4>
AVX512 void range_avx512(const Args& a, int64_t n0, int64_t n1) {
  // Rows outer, outputs inner: one tile's R x K of x stays in L1 while the weights stream.
  for (int64_t r0 = 0; r0 < a.M; r0 += R)
    for (int64_t n = n0; n < n1; ++n) {
      switch (std::min(R, a.M - r0)) {  // a full tile, or the last rows
        case 1: rows_avx512<Q4, 1>(a, n, r0); break;
        case 2: rows_avx512<Q4, 2>(a, n, r0); break;
        case 3: rows_avx512<Q4, 3>(a, n, r0); break;
        case 4: rows_avx512<Q4, 4>(a, n, r0); break;
        case 5: rows_avx512<Q4, 5>(a, n, r0); break;
        case 6: rows_avx512<Q4, 6>(a, n, r0); break;
        case 7: rows_avx512<Q4, 7>(a, n, r0); break;
        default: rows_avx512<Q4, R>(a, n, r0); break;
      }
    }
}
#endif

using RangeFn = void (*)(const Args&, int64_t, int64_t);

RangeFn pick(bool q4) {
#ifdef HAVE_AVX512_PATH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return q4 ? &range_avx512<true> : &range_avx512<false>;
#endif
  return &range_portable;
}

}  // namespace

// y[M, N] = x[M, K] W^T + bias. K is a multiple of 32 (the caller checks). m == null: q8_0.
extern "C" void pagedllm_quant_linear(const float* x, const void* q, const uint16_t* d,
                                      const uint16_t* m, const float* bias, float* out, int64_t M,
                                      int64_t N, int64_t K) {
  static const RangeFn q8 = pick(false), q4 = pick(true);
  const Args a{x, q, d, m, bias, out, M, N, K};
  const RangeFn fn = m == nullptr ? q8 : q4;
  // A task is a run of output features: enough weight bytes (~64 KB) that splitting a small
  // layer across threads costs less than it saves.
  const int64_t bytes_per_row = m == nullptr ? K + K / QK * 2 : K / 2 + K / QK * 4;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / bytes_per_row);
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}
