// The layers' small ops on the CPU, one pass over each row: RMSNorm (+ residual add), SiLU-mul
// and rotary embedding. Twins: layers/norm.py, activation.py, rotary.py, whose PyTorch code runs
// each op as several tiny kernels (RMSNorm alone is about eight), each with its own dispatch
// and temporaries: at decode batch 1 that overhead is most of these ops' time.
//
// Every row rounds where the twin rounds (storage is fp32 or bf16, the raw 16 bits widened on
// load and rounded to nearest even on store; arithmetic is fp32, but for exp's polynomial), so
// rotary gives the twin's bits and SiLU-mul and RMSNorm are within a rounding of it (exp is
// computed here, correctly rounded where PyTorch's is within 1 ulp; RMSNorm adds its squares in
// another order).
//
// Batch invariance: work is split over rows only and a row's arithmetic is fixed by this source
// (no -ffast-math, no reassociation), so a row's result never depends on the other rows of the
// call or on the thread count.
//
// NOTE: like paged_decode_cpu.cpp (which says why), plain C entry points called through ctypes
// (ops/cpu_layer_ops.py checks the tensors and allocates the outputs); baseline, AVX2+FMA and
// AVX-512 copies of each op are compiled and picked once by CPUID.

// The twins round every product before adding it: no a * b + c may become one fused
// multiply-add (GCC contracts by default where FMA is available, i.e. in the AVX2 copies).
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace {

using namespace pagedllm_cpu;

// x rounded to T and widened back: where the twin stores an intermediate tensor of dtype T.
template <typename T>
INLINE float round_as(float x) {
  T t;
  store(&t, x);
  return to_float(t);
}

constexpr int W = 16;  // partial sums of RMSNorm's sum of squares (cpu_common.h: sum_lanes)

// a * b + c: one fused multiply-add where the instruction set has it (kFma: the AVX2 and AVX-512
// copies), else two roundings. Only for arithmetic of this file's own (exp), never the twins'.
template <bool kFma>
INLINE double mul_add(double a, double b, double c) {
  if constexpr (kFma) return __builtin_fma(a, b, c);
  return a * b + c;
}

// exp(t) for -87 <= t <= 88, rounded once to fp32 from a double: 2^n * exp(r), n = round(t / ln
// 2), |r| <= ln(2) / 2, exp(r) by its degree-10 Taylor polynomial (relative error < 3e-13).
// Nearly always the correctly rounded value (tests/ops/test_cpu_layer_ops.py); plain
// arithmetic, not libm's expf, so that the loop vectorizes.
template <bool kFma>
INLINE float exp_clamped(float t) {
  const double x = t;
  const double n = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
  const double r = x - n * 0.6931471805599453;  // error ~ 127 * 2e-17: far below fp32's ulp
  double p = 1.0 / 3628800;  // NOTE: written out: GCC does not vectorize a loop over these
  p = mul_add<kFma>(p, r, 1.0 / 362880);
  p = mul_add<kFma>(p, r, 1.0 / 40320);
  p = mul_add<kFma>(p, r, 1.0 / 5040);
  p = mul_add<kFma>(p, r, 1.0 / 720);
  p = mul_add<kFma>(p, r, 1.0 / 120);
  p = mul_add<kFma>(p, r, 1.0 / 24);
  p = mul_add<kFma>(p, r, 1.0 / 6);
  p = mul_add<kFma>(p, r, 0.5);
  p = mul_add<kFma>(p, r, 1.0);
  p = mul_add<kFma>(p, r, 1.0);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return static_cast<float>(p * scale);
}

// ---- RMSNorm: rows of n elements at x + (i / inner) * outer_stride + (i % inner) * inner_stride
// (a [T, N] tensor, or the heads of a [T, H, D] view: Qwen3's q/k norm); outputs contiguous.
struct RmsNorm {
  const void *x, *residual, *weight;  // residual and weight may be null
  void *out, *residual_out;
  int64_t n, inner, x_outer, x_inner, r_outer, r_inner;
  float eps;

  // The twin: s = x + residual (in T); y = T(s * rsqrt(mean(s^2) + eps)); out = weight * y.
  // Without a weight, out = y (the caller multiplies by a weight of another dtype).
  template <typename T, bool>
  INLINE void rows(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t outer = i / inner, in = i % inner;
      const T* src = static_cast<const T*>(x) + outer * x_outer + in * x_inner;
      T* o = static_cast<T*>(out) + i * n;
      if (residual != nullptr) {
        const T* r = static_cast<const T*>(residual) + outer * r_outer + in * r_inner;
        T* s = static_cast<T*>(residual_out) + i * n;
        for (int64_t d = 0; d < n; ++d) store(s + d, to_float(src[d]) + to_float(r[d]));
        src = s;
      }
      float acc[W] = {};
      int64_t d = 0;
      for (; d + W <= n; d += W)
        for (int j = 0; j < W; ++j) {
          const float v = to_float(src[d + j]);
          acc[j] += v * v;
        }
      for (; d < n; ++d) acc[0] += to_float(src[d]) * to_float(src[d]);
      // PyTorch's CPU mean is the sum divided by n; its rsqrt is 1 / sqrt.
      const float rstd = 1.f / std::sqrt(sum_lanes<W>(acc) / static_cast<float>(n) + eps);
      if (weight == nullptr) {
        for (d = 0; d < n; ++d) store(o + d, to_float(src[d]) * rstd);
      } else {
        const T* w = static_cast<const T*>(weight);
        for (d = 0; d < n; ++d)
          store(o + d, to_float(w[d]) * round_as<T>(to_float(src[d]) * rstd));
      }
    }
  }
};

// ---- SiLU-mul: row i of x is [gate | up] (2 d elements at x + i * x_stride); out contiguous.
struct SiluMul {
  const void* x;
  void* out;
  int64_t d, x_stride;

  // The twin: silu = T(g / (1 + exp(-g))), out = T(silu * up). Below g = -88 PyTorch's exp
  // overflows (silu = -0) where this one's is clamped (silu ~ -5e-37): the same in any use.
  template <typename T, bool kFma>
  INLINE void rows(int64_t begin, int64_t end) const {
    // NOTE: in loops of their own, over chunks of a row: in one loop, the clamp (a branch to
    // GCC) keeps the exp from vectorizing.
    constexpr int64_t CHUNK = 256;
    float e[CHUNK];
    for (int64_t i = begin; i < end; ++i) {
      const T* gate = static_cast<const T*>(x) + i * x_stride;
      const T* up = gate + d;
      T* o = static_cast<T*>(out) + i * d;
      for (int64_t j0 = 0; j0 < d; j0 += CHUNK) {
        const int64_t m = std::min(CHUNK, d - j0);
        // exp(-87) vanishes next to 1 already; beyond 88 fp32's exp overflows.
        for (int64_t j = 0; j < m; ++j)
          e[j] = std::min(std::max(-to_float(gate[j0 + j]), -87.f), 88.f);
        for (int64_t j = 0; j < m; ++j) e[j] = exp_clamped<kFma>(e[j]);
        for (int64_t j = 0; j < m; ++j) {
          const float g = to_float(gate[j0 + j]);
          store(o + j0 + j, round_as<T>(g / (1.f + e[j])) * to_float(up[j0 + j]));
        }
      }
    }
  }
};

// ---- Rotary ("rotate half"): token i's heads at q + i * q_token + h * q_head (likewise k),
// position positions[i], cos/sin rows of cs_stride fp32; outputs contiguous [T, H, D].
struct Rotary {
  const int64_t* positions;
  const void *q, *k;
  void *q_out, *k_out;
  const float *cos, *sin;
  int64_t num_q_heads, num_kv_heads, head_dim, q_token, q_head, k_token, k_head, cs_stride;

  // The twin: x * T(cos) + rotate_half(x) * T(sin), each product and the sum rounded to T.
  // (-x2) * s is exactly -(x2 * s): a - x2 * s gives its bits.
  template <typename T>
  INLINE void heads(const T* x, T* o, int64_t num_heads, int64_t head_stride, const float* c,
                    const float* s) const {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < num_heads; ++h, o += head_dim) {
      const T* xh = x + h * head_stride;
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = to_float(xh[d]), x2 = to_float(xh[d + half]);
        const float c1 = round_as<T>(c[d]), s1 = round_as<T>(s[d]);
        const float c2 = round_as<T>(c[d + half]), s2 = round_as<T>(s[d + half]);
        store(o + d, round_as<T>(x1 * c1) - round_as<T>(x2 * s1));
        store(o + d + half, round_as<T>(x2 * c2) + round_as<T>(x1 * s2));
      }
    }
  }

  template <typename T, bool>
  INLINE void rows(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cos + positions[i] * cs_stride;
      const float* s = sin + positions[i] * cs_stride;
      heads(static_cast<const T*>(q) + i * q_token,
            static_cast<T*>(q_out) + i * num_q_heads * head_dim, num_q_heads, q_head, c, s);
      heads(static_cast<const T*>(k) + i * k_token,
            static_cast<T*>(k_out) + i * num_kv_heads * head_dim, num_kv_heads, k_head, c, s);
    }
  }
};

// One copy of each op per instruction set; the op's rows() is inlined into each.
template <typename Op>
using RowsFn = void (*)(const Op&, int64_t, int64_t);

template <typename Op, typename T>
void rows_baseline(const Op& op, int64_t b, int64_t e) { op.template rows<T, false>(b, e); }

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_PATHS 1
template <typename Op, typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const Op& op, int64_t b, int64_t e) {
  op.template rows<T, true>(b, e);
}
template <typename Op, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void rows_avx512(
    const Op& op, int64_t b, int64_t e) {
  op.template rows<T, true>(b, e);
}
#endif

template <typename Op, typename T>
RowsFn<Op> pick() {
#ifdef HAVE_X86_PATHS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return &rows_avx512<Op, T>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &rows_avx2<Op, T>;
#endif
  return &rows_baseline<Op, T>;
}

// Rows in chunks of at least ~20 us of work: a thread's start-up costs a few microseconds (far
// more on a busy machine), so decode-sized calls run on the calling thread alone (and a call of
// 1-4 rows always does). row_ns: a rough single-core cost of one row (measured with AVX-512).
constexpr int64_t GRAIN_NS = 20000;

template <typename Op>
void run(const Op& op, int is_bf16, int64_t num_rows, int64_t row_ns) {
  static const RowsFn<Op> f32 = pick<Op, float>(), b16 = pick<Op, bf16_bits>();
  const RowsFn<Op> fn = is_bf16 ? b16 : f32;
  const int64_t grain = std::max<int64_t>(4, GRAIN_NS / std::max<int64_t>(row_ns, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t b, int64_t e) { fn(op, b, e); });
}

}  // namespace

extern "C" void pagedllm_rms_norm(const void* x, const void* residual, const void* weight,
                                  void* out, void* residual_out, int is_bf16, int64_t num_rows,
                                  int64_t n, int64_t inner, int64_t x_outer, int64_t x_inner,
                                  int64_t r_outer, int64_t r_inner, float eps) {
  const RmsNorm op{x, residual, weight, out, residual_out, n, inner, x_outer, x_inner,
                   r_outer, r_inner, eps};
  run(op, is_bf16, num_rows, (residual != nullptr ? 3 : 2) * n / 8);
}

extern "C" void pagedllm_silu_and_mul(const void* x, void* out, int is_bf16, int64_t num_rows,
                                      int64_t d, int64_t x_stride) {
  run(SiluMul{x, out, d, x_stride}, is_bf16, num_rows, d / 2);
}

// Returns 0, or 1 if a position is out of [0, num_positions) (nothing is computed then).
extern "C" int pagedllm_rotary_embedding(
    const int64_t* positions, const void* q, const void* k, void* q_out, void* k_out,
    const float* cos, const float* sin, int is_bf16, int64_t num_tokens, int64_t num_q_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t q_token, int64_t q_head, int64_t k_token,
    int64_t k_head, int64_t cs_stride, int64_t num_positions) {
  for (int64_t i = 0; i < num_tokens; ++i)
    if (positions[i] < 0 || positions[i] >= num_positions) return 1;
  const Rotary op{positions, q, k, q_out, k_out, cos, sin, num_q_heads, num_kv_heads, head_dim,
                  q_token, q_head, k_token, k_head, cs_stride};
  run(op, is_bf16, num_tokens, (num_q_heads + num_kv_heads) * head_dim / 2);
  return 0;
}
