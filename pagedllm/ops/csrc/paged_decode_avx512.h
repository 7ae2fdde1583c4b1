// The AVX-512 task of paged_decode_cpu.cpp (fp32 or bf16 caches, head_dim 32/64/128), included
// by it inside its namespace, after the Args, Context and helpers it uses: kept apart only so
// that each file stays readable on its own. ops/cpu_build.py rebuilds the library when it changes.

#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX512_PATH 1
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

// 16 stored elements as 16 fp32 lanes: bf16 is widened exactly (its bits are the top half).
AVX512 INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 INLINE __m512 load16(const bf16_bits* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 16 fp32 lanes to storage; bf16 through cpu_common's store(), the one rounding every kernel
// here uses (once per output row, off the hot loops).
AVX512 INLINE void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
AVX512 INLINE void store16(bf16_bits* p, __m512 x) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, x);
  for (int i = 0; i < 16; ++i) store(p + i, lanes[i]);
}

// Pass 2 of attend_avx512 for NG query heads of KV head j (rows r0..r0+NG-1): their output rows
// stay in NG * DV vector registers through the whole context (attend() keeps them in memory,
// a load and a store around every multiply-add).
template <typename T, int DV, int NG>
AVX512 INLINE void weigh_values(const Args& a, const Context& c, const T* value,
                                const float* s, const float* inv_sum, int64_t r0, T* out) {
  const int32_t* table = c.table;
  const int64_t B = a.block_size, t0 = c.t0, len = c.len, n = c.n, num_used = c.num_used;
  __m512 acc[NG][DV];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t b = c.b0, t = t0; b < num_used; ++b) {
    const T* rows = value + table[b] * a.kv_block_stride;
    const T* next = b + 1 < num_used ? value + table[b + 1] * a.kv_block_stride : nullptr;
    for (int64_t i = t % B; i < B && t < len; ++i, ++t) {
      const T* row = rows + i * a.kv_token_stride;
      if (next != nullptr) prefetch_row(next + i * a.kv_token_stride, 16 * DV);
      __m512 vv[DV];
      for (int v = 0; v < DV; ++v) vv[v] = load16(row + 16 * v);
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(s[(r0 + g) * n + t - t0]);
        for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
      }
    }
  }
  for (int g = 0; g < NG; ++g) {
    const __m512 w = _mm512_set1_ps(inv_sum[r0 + g]);
    for (int v = 0; v < DV; ++v)
      store16(out + (r0 + g) * 16 * DV + 16 * v, _mm512_mul_ps(acc[g][v], w));
  }
}

// attend() for head_dim = 16 * DV, in AVX-512 registers: the same two passes, but a score is DV
// vector products summed in one fixed order (a tree inside the register), and the KV head's G
// query rows are scored together against each key row it loads once. The scores are no longer
// a chain of dependent additions each (attend()'s dot), and pass 2 keeps its sums in registers:
// ~3x attend() per row. bf16 rows are widened on load (exact), so fp32 and bf16 caches run the
// same arithmetic. Every row of every call takes this same code (a model has one head_dim and
// one cache dtype), so a row's bits still never depend on the batch.
template <typename T, int DV>
AVX512 void attend_avx512(const Args& a, int64_t seq, int64_t h0, int64_t nh,
                          std::vector<float>& scratch) {
  constexpr int64_t D = 16 * DV;
  constexpr int HG = DV >= 4 ? 16 / DV : 4;  // query heads per pass 2 (<= 16 accumulators)
  const int64_t G = a.group, B = a.block_size, R = nh * G;
  T* out = static_cast<T*>(a.out) + (seq * a.num_kv_heads + h0) * G * D;
  const Context c = context_of(a, seq);
  if (!c.ok) {
    if (c.len <= 0)  // the twin's fully masked row is zeros
      for (int64_t i = 0; i < R * D; ++i) store(out + i, 0.f);
    return;
  }
  const int32_t* table = c.table;
  const int64_t len = c.len, t0 = c.t0, n = c.n, b0 = c.b0, num_used = c.num_used;
  scratch.resize(R * D + R * n + R);  // q (fp32) | scores | 1 / row sums
  float* q = scratch.data();
  float* s = q + R * D;
  float* inv_sum = s + R * n;
  query_rows<T>(a, seq, h0, R, D, q);
  const int64_t head0 = h0 * a.kv_head_stride;
  const T* key = static_cast<const T*>(a.key_cache) + head0;
  const T* value = static_cast<const T*>(a.value_cache) + head0;
  for (int64_t b = b0, t = t0; b < num_used; ++b) {  // pass 1: scores, s[r * n + t - t0]
    const T* k = key + table[b] * a.kv_block_stride;
    const T* next = b + 1 < num_used ? key + table[b + 1] * a.kv_block_stride
                                     : value + table[b0] * a.kv_block_stride;
    for (int64_t i = t % B; i < B && t < len; ++i, ++t) {
      const T* row = k + i * a.kv_token_stride;
      prefetch_heads(a, next + i * a.kv_token_stride, nh);
      for (int64_t j = 0; j < nh; ++j) {
        const T* kr = row + j * a.kv_head_stride;
        __m512 kv[DV];
        for (int v = 0; v < DV; ++v) kv[v] = load16(kr + 16 * v);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = j * G + g;
          const float* qr = q + r * D;
          __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qr), kv[0]);
          for (int v = 1; v < DV; ++v) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), kv[v], dot);
          s[r * n + t - t0] = _mm512_reduce_add_ps(dot) * a.scale;
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax numerators, in place
    float* sr = s + r * n;
    inv_sum[r] = 1.f / exp_sum(sr, n, max_of(sr, n));
  }
  for (int64_t j = 0; j < nh; ++j) {  // pass 2, per KV head and group of its query heads
    const T* vj = value + j * a.kv_head_stride;
    for (int64_t g = 0; g < G; g += HG) {
      const int64_t r0 = j * G + g;
      switch (std::min<int64_t>(HG, G - g)) {
        case 1: weigh_values<T, DV, 1>(a, c, vj, s, inv_sum, r0, out); break;
        case 2: weigh_values<T, DV, 2>(a, c, vj, s, inv_sum, r0, out); break;
        case 3: weigh_values<T, DV, 3>(a, c, vj, s, inv_sum, r0, out); break;
        default: weigh_values<T, DV, HG>(a, c, vj, s, inv_sum, r0, out); break;
      }
    }
  }
}

// head_dim 32, 64 and 128 (DV = 2, 4, 8) have the AVX-512 task.
template <typename T>
AVX512 void range_avx512(const Args& a, int64_t h, int64_t b, int64_t e) {
  std::vector<float> scratch;
  const int64_t tasks_per_seq = a.num_kv_heads / h;
  for (int64_t i = b; i < e; ++i) {
    const int64_t seq = i / tasks_per_seq, h0 = (i % tasks_per_seq) * h;
    switch (a.head_dim) {
      case 32: attend_avx512<T, 2>(a, seq, h0, h, scratch); break;
      case 64: attend_avx512<T, 4>(a, seq, h0, h, scratch); break;
      default: attend_avx512<T, 8>(a, seq, h0, h, scratch); break;
    }
  }
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
#endif
