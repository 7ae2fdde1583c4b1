// Paged decode attention on the CPU: the twin of torch_ref.paged_decode_attention, without its
// gather. Each query row has its own block table and context length (a prompt's rows too:
// cpu_kernels.paged_prefill_attention). A task is one row, or a tile of up to 16 consecutive
// positions of one prompt (rows with one table, lengths len, len + 1, ...), and all or one of
// its KV heads: it reads the K rows, then the V rows, straight out of the paged cache through
// the block table, for all the query heads that share a KV head (r = one query head of one row,
// t = one context token):
//
//   pass 1  s[r, t] = scale * q[r] . k[t]            t0 <= t < len   (scores, fp32)
//   softmax p[r, t] = exp(s[r, t] - max_t s[r, :])   (two-pass: the exact max first)
//   pass 2  o[r]    = sum_t p[r, t] v[t] / sum_t p[r, t]
//
// t0 = max(len - window, 0), n = len - t0: a sliding window reads only the blocks that hold its
// last `window` tokens (earlier ones may be freed); full attention passes a window >= len.
//
// Storage is fp32 or bf16 (the raw 16 bits, widened on load); arithmetic is always fp32. Inner
// loops are written so -O3 vectorizes them without -ffast-math; on x86 an AVX2+FMA copy of the
// whole task is compiled next to the baseline one and picked once, on the first call, by CPUID.
// Caches with head_dim 32, 64 or 128 take an AVX-512 task instead where the CPU has it
// (paged_decode_avx512.h: the same passes with intrinsics, on tiles; the others run a tile row
// by row). A row's arithmetic never depends on the other rows of its tile or call.
//
// NOTE: a plain C entry point called through ctypes (ops/cpu_kernels.py checks the tensors and
// allocates the output), not a torch op: the op-registration and Tensor headers take ~12 s to
// compile, this file ~3 s. The only torch header is at::parallel_for's, so tasks run on torch's
// own intra-op threads (built with -fopenmp: the process's one libgomp, already loaded by torch).

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

using namespace pagedllm_cpu;

constexpr int W = 8;  // partial sums of a reduction: one or two vector registers

template <typename T>
INLINE float dot(const float* q, const T* k, int64_t n) {  // q . k over n elements
  float acc[W] = {};
  int64_t d = 0;
  for (; d + W <= n; d += W)
    for (int j = 0; j < W; ++j) acc[j] += q[d + j] * to_float(k[d + j]);
  for (; d < n; ++d) acc[0] += q[d] * to_float(k[d]);
  return sum_lanes<W>(acc);
}

// NOTE: a ?: on values, not std::max (which returns a reference): GCC vectorizes only the former.
INLINE float max_of(const float* x, int64_t n) {
  float acc[W];
  for (int j = 0; j < W; ++j) acc[j] = x[0];
  int64_t t = 0;
  for (; t + W <= n; t += W)
    for (int j = 0; j < W; ++j) acc[j] = x[t + j] > acc[j] ? x[t + j] : acc[j];
  for (; t < n; ++t) acc[0] = std::max(acc[0], x[t]);
  for (int j = 1; j < W; ++j) acc[0] = std::max(acc[0], acc[j]);
  return acc[0];
}

// exp(x) for -87 <= x <= 0 (exp(-87) ~ 1.6e-38 is still normal: 2^n needs n >= -126), to ~1
// ulp: 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its degree-6 Taylor
// polynomial. Plain arithmetic, not libm's expf, so that the loop over scores vectorizes.
INLINE float exp_nonpositive(float x) {
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// x[t] = exp(x[t] - m) in place; returns their sum.
// NOTE: clamping in a loop of its own: inside the exp loop the clamp blocks vectorization.
INLINE float exp_sum(float* x, int64_t n, float m) {
  for (int64_t t = 0; t < n; ++t) x[t] = std::max(x[t] - m, -87.f);
  for (int64_t t = 0; t < n; ++t) x[t] = exp_nonpositive(x[t]);
  float acc[W] = {};
  int64_t t = 0;
  for (; t + W <= n; t += W)
    for (int j = 0; j < W; ++j) acc[j] += x[t + j];
  for (; t < n; ++t) acc[0] += x[t];
  return sum_lanes<W>(acc);
}

// Pull one row into the cache ahead of use.
template <typename T>
INLINE void prefetch_row(const T* row, int64_t n) {
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + i);
}

struct Args {
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  void* out;
  float scale;
  int64_t max_len;  // per-sequence bound on the context (max_seq_len, block-table width)
  int64_t window;   // keys at distance >= window from the query are hidden
  int64_t num_kv_heads, group, head_dim, block_size, num_blocks;
  int64_t q_seq_stride, q_head_stride;                       // query (out is contiguous)
  int64_t kv_block_stride, kv_token_stride, kv_head_stride;  // key_cache and value_cache
  int64_t bt_stride;
  std::atomic<bool>* bad_block;
};

// Prefetch one token's rows for nh KV heads, the first at `row`.
template <typename T>
INLINE void prefetch_heads(const Args& a, const T* row, int64_t nh) {
  for (int64_t j = 0; j < nh; ++j) prefetch_row(row + j * a.kv_head_stride, a.head_dim);
}

// The keys query row `row` reads: positions [t0, len) (a sliding window drops the
// earlier ones), in blocks [b0, num_used) of its table. `ok` is false when there is nothing to
// read (len <= 0: the caller writes the twin's zeros) or a used table entry is out of range
// (the call's bad_block is raised); only the used entries are checked: the rest may be garbage.
struct Context {
  const int32_t* table;
  int64_t len, t0, n, b0, num_used;
  bool ok;
};

INLINE Context context_of(const Args& a, int64_t row) {
  Context c{a.block_tables + row * a.bt_stride, std::min<int64_t>(a.seq_lens[row], a.max_len),
            0, 0, 0, 0, false};
  if (c.len <= 0) return c;
  const int64_t B = a.block_size;
  c.t0 = std::max<int64_t>(c.len - a.window, 0);
  c.n = c.len - c.t0;
  c.b0 = c.t0 / B;
  c.num_used = (c.len + B - 1) / B;
  for (int64_t b = c.b0; b < c.num_used; ++b) {
    if (c.table[b] < 0 || c.table[b] >= a.num_blocks) {
      a.bad_block->store(true, std::memory_order_relaxed);
      return c;
    }
  }
  c.ok = true;
  return c;
}

// A task: query rows [r0, r0 + rows) (rows > 1 only for rows that read one block table: a
// prompt's consecutive rows, a tile) and KV heads [h0, h0 + nh) of each; `cost` estimates its
// work (rows x keys), so that the costliest run first.
constexpr int64_t kMaxTileRows = 16;

struct Task {
  int64_t r0, rows, h0, nh, cost;
};

// The R query heads of query row `row` from KV head h0 on (consecutive in the query), widened to
// fp32 into q (R x D, contiguous): both tasks score from this copy.
template <typename T>
INLINE void query_rows(const Args& a, int64_t row, int64_t h0, int64_t R, int64_t D, float* q) {
  const T* query =
      static_cast<const T*>(a.query) + row * a.q_seq_stride + h0 * a.group * a.q_head_stride;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) q[r * D + d] = to_float(query[r * a.q_head_stride + d]);
}

// One query row, KV heads [h0, h0 + nh): its R = nh * G query heads (consecutive in the query).
// scratch: q (R x D) | acc (R x D) | 1 / row sums (R) | scores (R x n).
template <typename T>
INLINE void attend(const Args& a, int64_t row, int64_t h0, int64_t nh,
                   std::vector<float>& scratch) {
  const int64_t G = a.group, D = a.head_dim, B = a.block_size, R = nh * G;
  T* out = static_cast<T*>(a.out) + (row * a.num_kv_heads + h0) * G * D;
  const Context c = context_of(a, row);
  if (!c.ok) {
    if (c.len <= 0)  // the twin's fully masked row is zeros
      for (int64_t i = 0; i < R * D; ++i) store(out + i, 0.f);
    return;
  }
  const int32_t* table = c.table;
  const int64_t len = c.len, t0 = c.t0, n = c.n, b0 = c.b0, num_used = c.num_used;
  scratch.resize(2 * R * D + R + R * n);
  float* q = scratch.data();
  float* acc = q + R * D;
  float* inv_sum = acc + R * D;
  float* s = inv_sum + R;
  query_rows<T>(a, row, h0, R, D, q);
  std::fill(acc, acc + R * D, 0.f);

  // Token t is row t % B of block table[t / B]; its KV head h0 + j starts at element
  //   table[t / B] * kv_block_stride + (t % B) * kv_token_stride + (h0 + j) * kv_head_stride
  // Blocks are scattered, so the hardware prefetcher cannot guess the next one: while block b
  // is read, row by row, the same rows of block b + 1 are prefetched (after the last block of K,
  // the first block of V).
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
      for (int64_t j = 0; j < nh; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = j * G + g;
          s[r * n + t - t0] = dot(q + r * D, row + j * a.kv_head_stride, D) * a.scale;
        }
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // softmax numerators, in place
    float* sr = s + r * n;
    inv_sum[r] = 1.f / exp_sum(sr, n, max_of(sr, n));
  }
  for (int64_t b = b0, t = t0; b < num_used; ++b) {  // pass 2: acc[r] += p[r, t] v[t]
    const T* v = value + table[b] * a.kv_block_stride;
    const T* next = b + 1 < num_used ? value + table[b + 1] * a.kv_block_stride : nullptr;
    for (int64_t i = t % B; i < B && t < len; ++i, ++t) {
      const T* row = v + i * a.kv_token_stride;
      if (next != nullptr) prefetch_heads(a, next + i * a.kv_token_stride, nh);
      for (int64_t j = 0; j < nh; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = j * G + g;
          const float p = s[r * n + t - t0];
          float* o = acc + r * D;
          const T* vj = row + j * a.kv_head_stride;
          for (int64_t d = 0; d < D; ++d) o[d] += p * to_float(vj[d]);
        }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) store(out + r * D + d, acc[r * D + d] * inv_sum[r]);
}

// A task, one row at a time.
template <typename T>
INLINE void attend_rows(const Args& a, const Task& task, std::vector<float>& scratch) {
  for (int64_t i = 0; i < task.rows; ++i) attend<T>(a, task.r0 + i, task.h0, task.nh, scratch);
}

using TaskFn = void (*)(const Args&, const Task&, std::vector<float>&);

template <typename T>
void task_baseline(const Args& a, const Task& t, std::vector<float>& scratch) {
  attend_rows<T>(a, t, scratch);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2_PATH 1
template <typename T>
__attribute__((target("avx2,fma"))) void task_avx2(const Args& a, const Task& t,
                                                   std::vector<float>& scratch) {
  attend_rows<T>(a, t, scratch);
}
#endif

#include "paged_decode_avx512.h"  // task_avx512, has_avx512 (HAVE_AVX512_PATH)

template <typename T>
TaskFn pick() {
#ifdef HAVE_AVX2_PATH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &task_avx2<T>;
#endif
  return &task_baseline<T>;
}

// Whether two rows' tables agree on every entry either row uses (and those before them).
INLINE bool same_table(const Context& c, const Context& d) {
  const int64_t n = std::max(c.num_used, d.num_used);
  return c.table == d.table || std::memcmp(c.table, d.table, n * sizeof(int32_t)) == 0;
}

// The call's tasks: tiles of up to kMaxTileRows consecutive rows that are consecutive positions
// of one sequence (one table, each row's context one token longer: their keys join up, so a
// tile reads no block that none of its rows checked); `tile` false: a row each. A decode row's
// task reads each token's K/V rows for all KV heads, one contiguous run (the prefetcher's
// favourite); with too few tasks to keep every thread busy, or prompt tiles (whose rows re-read
// a block per KV head from the L2 cache, not memory), a task per KV head. The costliest first.
std::vector<Task> make_tasks(const Args& a, int64_t num_rows, bool tile, int64_t threads) {
  std::vector<Task> tiles;
  bool all_single = true;
  for (int64_t r = 0; r < num_rows;) {
    const Context c = context_of(a, r);
    int64_t n = 1, len = c.len;
    if (tile && c.ok)
      for (; n < kMaxTileRows && r + n < num_rows; ++n) {
        const Context d = context_of(a, r + n);
        if (!d.ok || d.len != len + 1 || !same_table(c, d)) break;
        len = d.len;
      }
    tiles.push_back({r, n, 0, a.num_kv_heads, n * std::max<int64_t>(len, 1)});
    all_single = all_single && n == 1;
    r += n;
  }
  const int64_t nh =
      all_single && static_cast<int64_t>(tiles.size()) >= 4 * threads ? a.num_kv_heads : 1;
  std::vector<Task> tasks;
  for (const Task& t : tiles)
    for (int64_t h0 = 0; h0 < a.num_kv_heads; h0 += nh)
      tasks.push_back({t.r0, t.rows, h0, nh, t.cost});
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

}  // namespace

// Returns 0, or 1 if a used block-table entry is out of [0, num_blocks) (nothing is read then).
extern "C" int pagedllm_paged_decode_attention(
    const void* query, const void* key_cache, const void* value_cache,
    const int32_t* block_tables, const int32_t* seq_lens, void* out, int is_bf16,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t num_blocks, int64_t block_size, float scale, int64_t max_len, int64_t window,
    int64_t q_seq_stride, int64_t q_head_stride, int64_t kv_block_stride,
    int64_t kv_token_stride, int64_t kv_head_stride, int64_t bt_stride) {
  std::atomic<bool> bad_block{false};
  const Args a{query, key_cache, value_cache, block_tables, seq_lens, out, scale, max_len, window,
               num_kv_heads, num_heads / num_kv_heads, head_dim, block_size, num_blocks,
               q_seq_stride, q_head_stride, kv_block_stride, kv_token_stride, kv_head_stride,
               bt_stride, &bad_block};
  static const TaskFn f32 = pick<float>(), b16 = pick<bf16_bits>();
  TaskFn fn = is_bf16 ? b16 : f32;
  bool tile = false;  // only the AVX-512 task takes tiles; the others run them row by row
#ifdef HAVE_AVX512_PATH
  static const bool avx512 = has_avx512();
  if (avx512 && (head_dim == 32 || head_dim == 64 || head_dim == 128)) {
    fn = is_bf16 ? &task_avx512<bf16_bits> : &task_avx512<float>;
    tile = true;
  }
#endif
  const int64_t threads = at::get_num_threads();
  const std::vector<Task> tasks = make_tasks(a, num_seqs, tile, threads);
  // Threads take the next task as they finish one (the costliest first): a prompt's rows cost
  // in proportion to their position, so equal shares of rows would leave a thread idle.
  std::atomic<int64_t> next{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min(threads, num_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (int64_t i = next++; i < num_tasks; i = next++) fn(a, tasks[i], scratch);
  });
  return bad_block.load() ? 1 : 0;
}

// The KV write (torch_ref.reshape_and_cache for a cache in the model's dtype): row t of key and
// value goes to cache slot slots[t] (block slots[t] / block_size, offset slots[t] % block_size);
// a negative slot (padding) is skipped. One call per layer instead of the twin's mask, gathers
// and two index_put ops. Returns 1, writing nothing, if a slot is out of range.
extern "C" int pagedllm_reshape_and_cache(
    const char* key, const char* value, char* key_cache, char* value_cache,
    const int64_t* slots, int64_t num_tokens, int64_t num_kv_heads, int64_t row_bytes,
    int64_t num_slots, int64_t block_size, int64_t k_token_stride, int64_t k_head_stride,
    int64_t v_token_stride, int64_t v_head_stride, int64_t c_block_stride,
    int64_t c_token_stride, int64_t c_head_stride) {  // strides in bytes
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= num_slots) return 1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    const int64_t at = (s / block_size) * c_block_stride + (s % block_size) * c_token_stride;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(key_cache + at + h * c_head_stride, key + t * k_token_stride + h * k_head_stride,
                  row_bytes);
      std::memcpy(value_cache + at + h * c_head_stride,
                  value + t * v_token_stride + h * v_head_stride, row_bytes);
    }
  }
  return 0;
}
