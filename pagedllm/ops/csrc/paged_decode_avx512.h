// The AVX-512 task of paged_decode_cpu.cpp (fp32 or bf16 caches, head_dim 32/64/128), included
// by it inside its namespace, after the Args, Context, Task and helpers it uses: kept apart only
// so that each file stays readable on its own. ops/cpu_build.py rebuilds the library when it
// changes.

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

// q . k for one query row (DV registers) and one key row: lane sums of D / 16 products, summed
// across lanes by sum16 or sum1 (the same order).
template <typename T, int DV>
AVX512 INLINE __m512 dot_lanes(const __m512* q, const T* k) {
  __m512 dot = _mm512_mul_ps(q[0], load16(k));
  for (int v = 1; v < DV; ++v) dot = _mm512_fmadd_ps(q[v], load16(k + 16 * v), dot);
  return dot;
}

// The sum of x's 16 lanes: lane i + lane i + 8, then + 4, then lanes 0 + 2 and 1 + 3, then those
// two (GCC's _mm512_reduce_add_ps order, which the previous kernel used; written out so that
// no compiler's header can change it).
AVX512 INLINE float sum1(__m512 x) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(x),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));  // c[0] = b[0] + b[2], c[1] = b[1] + b[3]
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// Lane k of the result = sum1(d[k]), in sum1's order: a score is the same bits whether its key
// is scored alone or in a block of 16. Four rounds of shuffles that pair up two vectors'
// halves, quarters, pairs and lanes: ~45 instructions for 16 sums instead of ~8 for each.
AVX512 INLINE __m512 sum16(const __m512* d) {
  __m512 e[8], f[4];
  for (int i = 0; i < 8; ++i)  // e[i]: lanes 0-7 = d[2i]'s i + (i + 8), lanes 8-15 = d[2i + 1]'s
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // f[m]: quarter j = key 4m + j's 4 partial sums (+ 4)
    f[m] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * m], e[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(e[2 * m], e[2 * m + 1], 0xDD));
  const __m512 g0 = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0x44),  // (+ 2)
                                  _mm512_shuffle_ps(f[0], f[1], 0xEE));
  const __m512 g1 = _mm512_add_ps(_mm512_shuffle_ps(f[2], f[3], 0x44),
                                  _mm512_shuffle_ps(f[2], f[3], 0xEE));
  // (+ 1): lane 4q + j of h = key 4j + q; the permutation puts key k in lane k
  const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(g0, g1, 0x88), _mm512_shuffle_ps(g0, g1, 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, h);
}

// Pass 2 for NG rows of one KV head: o[g] = sum_t p[g][t - tb] v[t] over each row's own keys
// [lo[g], hi[g]), in key order, the NG * DV sums in registers through the whole context; then
// scaled by 1 / the row's sum and stored to out[g].
template <typename T, int DV, int NG>
AVX512 INLINE void weigh_values(const Args& a, const int32_t* table, const T* value,
                                const float* const* p, int64_t tb, const int64_t* lo,
                                const int64_t* hi, const float* inv_sum, T* const* out) {
  const int64_t B = a.block_size;
  int64_t first = lo[0], last = hi[0];
  for (int g = 1; g < NG; ++g) first = std::min(first, lo[g]), last = std::max(last, hi[g]);
  __m512 acc[NG][DV];
  for (int g = 0; g < NG; ++g)
    for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_setzero_ps();
  const int64_t b_end = (last + B - 1) / B;
  for (int64_t b = first / B, t = first; b < b_end; ++b) {
    const T* rows = value + table[b] * a.kv_block_stride;
    const T* next = b + 1 < b_end ? value + table[b + 1] * a.kv_block_stride : nullptr;
    for (int64_t i = t % B; i < B && t < last; ++i, ++t) {
      const T* row = rows + i * a.kv_token_stride;
      if (next != nullptr) prefetch_row(next + i * a.kv_token_stride, 16 * DV);
      __m512 vv[DV];
      for (int v = 0; v < DV; ++v) vv[v] = load16(row + 16 * v);
      for (int g = 0; g < NG; ++g) {
        if (t < lo[g] || t >= hi[g]) continue;
        const __m512 pt = _mm512_set1_ps(p[g][t - tb]);
        for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_fmadd_ps(pt, vv[v], acc[g][v]);
      }
    }
  }
  for (int g = 0; g < NG; ++g) {
    const __m512 w = _mm512_set1_ps(inv_sum[g]);
    for (int v = 0; v < DV; ++v) store16(out[g] + 16 * v, _mm512_mul_ps(acc[g][v], w));
  }
}

// weigh_values for the first n (1 <= n <= N) of the rows given.
template <typename T, int DV, int N>
AVX512 INLINE void weigh_rows(int n, const Args& a, const int32_t* table, const T* value,
                              const float* const* p, int64_t tb, const int64_t* lo,
                              const int64_t* hi, const float* inv_sum, T* const* out) {
  if constexpr (N > 1)
    if (n < N) return weigh_rows<T, DV, N - 1>(n, a, table, value, p, tb, lo, hi, inv_sum, out);
  weigh_values<T, DV, N>(a, table, value, p, tb, lo, hi, inv_sum, out);
}

// Scores of one query row against `width` keys (1, or 16 summed together by sum16), the first
// at `key`: s[0 .. width).
template <typename T, int DV, int width>
AVX512 INLINE void score(const Args& a, const float* q, const T* key, __m512 scale, float* s) {
  __m512 qr[DV];
  for (int v = 0; v < DV; ++v) qr[v] = _mm512_loadu_ps(q + 16 * v);
  if constexpr (width == 16) {
    __m512 d[16];
    for (int n = 0; n < 16; ++n) d[n] = dot_lanes<T, DV>(qr, key + n * a.kv_token_stride);
    _mm512_storeu_ps(s, _mm512_mul_ps(sum16(d), scale));
  } else {
    s[0] = sum1(dot_lanes<T, DV>(qr, key)) * a.scale;
  }
}

// Pass 1 over block b for KV head j: every tile row of that head whose keys meet the block,
// `width` keys at a time (the block's rows past a row's keys are scored too and never read).
template <typename T, int DV, int width>
AVX512 INLINE void score_block(const Args& a, const Task& task, const Context* c, int64_t nh,
                               int64_t j, int64_t b, const T* keys, const T* next,
                               const float* q, float* s, int64_t S, int64_t tb) {
  constexpr int64_t D = 16 * DV;
  const int64_t B = a.block_size, G = a.group, t_block = b * B;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t k = 0; k < B; k += width) {
    const T* key = keys + k * a.kv_token_stride + j * a.kv_head_stride;
    if (next != nullptr)
      for (int n = 0; n < width; ++n)
        prefetch_row(next + (k + n) * a.kv_token_stride + j * a.kv_head_stride, D);
    const int64_t t = t_block + k;
    for (int64_t i = 0; i < task.rows; ++i) {
      if (t + width <= c[i].t0 || t >= c[i].len) continue;  // none of the row's keys
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (i * nh + j) * G + g;
        score<T, DV, width>(a, q + r * D, key, scale, s + r * S + t - tb);
      }
    }
  }
}

// attend() for a tile (a Task: up to kMaxTileRows query rows that read the same block table: a
// decode row alone, or consecutive rows of one prompt) and head_dim = 16 * DV, in AVX-512
// registers. Each row takes attend()'s two passes, and its arithmetic does not depend on the
// rows beside it: a score is DV vector products summed in one fixed order (sum16's), the
// softmax runs over the row's own scores, pass 2 adds the row's own keys in order. So a row's
// bits never depend on the batch. What the tile shares is memory traffic: a block of keys is
// read from memory once for all its rows (a prompt row used to read its whole context alone;
// pass 2 reads the tile's values once per NG rows, from the L2 cache after the first), and
// with block_size a multiple of 16 a block's keys are summed 16 at a time (sum16) instead of
// one horizontal sum per score. bf16 rows are widened on load (exact), so fp32 and bf16
// caches run the same arithmetic.
//
// Tile row r = (i, j, g): query token i, KV head j of the task, query head g of that KV head,
// r = (i * nh + j) * G + g. Its keys are [c[i].t0, c[i].len); its scores s[r * S + t - tb].
template <typename T, int DV>
AVX512 void attend_tile(const Args& a, const Task& task, std::vector<float>& scratch) {
  constexpr int64_t D = 16 * DV;
  constexpr int NG = DV >= 4 ? 16 / DV : 4;  // rows per pass 2 (<= 16 accumulators)
  const int64_t G = a.group, B = a.block_size, nq = task.rows, h0 = task.h0, nh = task.nh;
  const int64_t per_token = nh * G, R = nq * per_token;
  T* out = static_cast<T*>(a.out);
  Context c[kMaxTileRows];
  for (int64_t i = 0; i < nq; ++i) c[i] = context_of(a, task.r0 + i);
  if (!c[0].ok) {  // (a tile of several rows has only rows that are ok)
    if (c[0].len <= 0)  // the twin's fully masked row is zeros
      for (int64_t k = 0; k < per_token * D; ++k)
        store(out + (task.r0 * a.num_kv_heads + h0) * G * D + k, 0.f);
    return;
  }
  const int32_t* table = c[0].table;
  int64_t b_lo = c[0].b0, b_hi = c[0].num_used;
  for (int64_t i = 1; i < nq; ++i)
    b_lo = std::min(b_lo, c[i].b0), b_hi = std::max(b_hi, c[i].num_used);
  const int64_t tb = b_lo * B, S = (b_hi - b_lo) * B;
  scratch.resize(R * D + R * S + R);  // q (fp32) | scores | 1 / row sums
  float* q = scratch.data();
  float* s = q + R * D;
  float* inv_sum = s + R * S;
  for (int64_t i = 0; i < nq; ++i)
    query_rows<T>(a, task.r0 + i, h0, per_token, D, q + i * per_token * D);
  const int64_t head0 = h0 * a.kv_head_stride;
  const T* key = static_cast<const T*>(a.key_cache) + head0;
  const T* value = static_cast<const T*>(a.value_cache) + head0;
  for (int64_t b = b_lo; b < b_hi; ++b) {  // pass 1
    const T* keys = key + table[b] * a.kv_block_stride;
    const T* next = b + 1 < b_hi ? key + table[b + 1] * a.kv_block_stride
                                 : value + table[b_lo] * a.kv_block_stride;
    for (int64_t j = 0; j < nh; ++j) {
      if (B % 16 == 0)
        score_block<T, DV, 16>(a, task, c, nh, j, b, keys, next, q, s, S, tb);
      else
        score_block<T, DV, 1>(a, task, c, nh, j, b, keys, next, q, s, S, tb);
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax numerators, in place, over the row's own keys
    const Context& ci = c[r / per_token];
    float* sr = s + r * S + ci.t0 - tb;
    inv_sum[r] = 1.f / exp_sum(sr, ci.n, max_of(sr, ci.n));
  }
  for (int64_t j = 0; j < nh; ++j) {  // pass 2, per KV head, NG of its rows at a time
    const T* vj = value + j * a.kv_head_stride;
    const float* p[NG];
    int64_t lo[NG], hi[NG];
    float inv[NG];
    T* dst[NG];
    int n = 0;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (i * nh + j) * G + g;
        p[n] = s + r * S, lo[n] = c[i].t0, hi[n] = c[i].len, inv[n] = inv_sum[r];
        dst[n] = out + ((task.r0 + i) * a.num_kv_heads + h0 + j) * G * D + g * D;
        if (++n < NG && !(i == nq - 1 && g == G - 1)) continue;
        weigh_rows<T, DV, NG>(n, a, table, vj, p, tb, lo, hi, inv, dst);
        n = 0;
      }
  }
}

// head_dim 32, 64 and 128 (DV = 2, 4, 8) have the AVX-512 task.
template <typename T>
AVX512 void task_avx512(const Args& a, const Task& task, std::vector<float>& scratch) {
  switch (a.head_dim) {
    case 32: attend_tile<T, 2>(a, task, scratch); break;
    case 64: attend_tile<T, 4>(a, task, scratch); break;
    default: attend_tile<T, 8>(a, task, scratch); break;
  }
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
#endif
