// A Llama decoder stack in one call, for a CPU model (ops/cpu_decoder.py says when it runs).
// Each layer is the model file's sequence of ops:
//
//   h, r   = rms_norm(x, r)                 (layer 0: h = rms_norm(x), r = x)
//   qkv    = h W_qkv^T (+ b)                [T, (Hq + 2 Hkv) D]
//   q, k   = rotary(positions, q, k)        [T, Hq, D], [T, Hkv, D]
//   cache <- k, v at slot_mapping
//   o      = paged attention(q, cache)      [T, Hq, D] (one query row per table row)
//   h, r   = rms_norm(o W_o^T, r)
//   x      = (silu(h W_gate^T) * h W_up^T) W_down^T
//
// NOTE: every op is the very kernel the model's modules call one at a time (quant_linear_cpu,
// layer_ops_cpu, paged_decode_cpu), reached through the C entry points of those libraries
// (function pointers handed over by the Python side), with the same arguments. So the stack is
// bitwise equal to the module path; what it removes is ~20 Python-side calls per layer, each a
// few microseconds, which at decode batch 1 cost more than the layer's arithmetic. Quantized
// weights (fp32 activations) take the C++ quantized matmul; fp32 and bf16 weights a callback
// into Python (`dense_linear`) that runs the module's own forward (ops.gemm.linear: oneDNN's
// packed GEMM, which has no C entry point) on this call's buffers, 4 calls a layer instead of
// ~20.

#include <cstdint>
#include <cstring>

namespace {

using QuantLinear = void (*)(const float* x, const void* q, const uint16_t* d, const uint16_t* m,
                             const float* bias, float* out, int64_t M, int64_t N, int64_t K);
using RmsNorm = void (*)(const void* x, const void* residual, const void* weight, void* out,
                         void* residual_out, int is_bf16, int64_t num_rows, int64_t n,
                         int64_t inner, int64_t x_outer, int64_t x_inner, int64_t r_outer,
                         int64_t r_inner, float eps);
using SiluMul = void (*)(const void* x, void* out, int is_bf16, int64_t num_rows, int64_t d,
                         int64_t x_stride);
using Rotary = int (*)(const int64_t* positions, const void* q, const void* k, void* q_out,
                       void* k_out, const float* cos, const float* sin, int is_bf16,
                       int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                       int64_t head_dim, int64_t q_token, int64_t q_head, int64_t k_token,
                       int64_t k_head, int64_t cs_stride, int64_t num_positions);
using KvWrite = int (*)(const char* key, const char* value, char* key_cache, char* value_cache,
                        const int64_t* slots, int64_t num_tokens, int64_t num_kv_heads,
                        int64_t row_bytes, int64_t num_slots, int64_t block_size,
                        int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                        int64_t v_head_stride, int64_t c_block_stride, int64_t c_token_stride,
                        int64_t c_head_stride);
using DenseLinear = const void* (*)(int64_t index, const void* x);  // its output; null: raised
using Attention = int (*)(const void* query, const void* key_cache, const void* value_cache,
                          const int32_t* block_tables, const int32_t* seq_lens, void* out,
                          int is_bf16, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                          int64_t head_dim, int64_t num_blocks, int64_t block_size, float scale,
                          int64_t max_len, int64_t window, int64_t q_seq_stride,
                          int64_t q_head_stride, int64_t kv_block_stride, int64_t kv_token_stride,
                          int64_t kv_head_stride, int64_t bt_stride);

}  // namespace

extern "C" {

// Mirrored field for field by ctypes structures in ops/cpu_decoder.py.
struct PagedllmKernels {
  QuantLinear quant_linear;
  RmsNorm rms_norm;
  SiluMul silu_and_mul;
  Rotary rotary;
  KvWrite kv_write;
  Attention attention;
  DenseLinear dense_linear;  // linear `index` = 4 * layer + (0 qkv, 1 o, 2 gate_up, 3 down)
};

struct PagedllmQuantLinear {  // one quantized weight [N, K] (ops/quant_linear.py's blocks)
  const void* qweight;   // null: a dense weight, through kn->dense_linear
  const uint16_t* scales;
  const uint16_t* mins;  // null: q8_0
  const float* bias;     // null: none
  int64_t n, k;
};

struct PagedllmLayer {
  const void* input_norm;  // [hidden], in the activations' dtype
  const void* post_norm;   // [hidden]
  PagedllmQuantLinear qkv, o, gate_up, down;
  void* key_cache;    // [num_blocks, block_size, Hkv, D], in the activations' dtype
  void* value_cache;  // same strides
  int64_t window;      // the sliding window, or 0: none
};

struct PagedllmShapes {
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
  int64_t num_blocks, block_size, kv_block_stride, kv_token_stride, kv_head_stride;
  int64_t num_positions, cs_stride;
  int64_t is_bf16;  // activations, norm weights and KV cache: bf16, else fp32
  float eps, scale;
};

struct PagedllmStep {
  const void* x;            // [T, hidden]: the embeddings (also layer 0's residual)
  void* hidden_out;         // [T, hidden]: the last layer's output
  void* residual_out;       // [T, hidden]: the residual beside it
  void* scratch;            // see the ledger in pagedllm_decoder_forward
  const int64_t* positions;  // [T]
  const int64_t* slots;      // [T]
  const float* cos;          // [num_positions, D]
  const float* sin;
  const int32_t* tables;     // [rows, width]: one block table per attention row
  const int32_t* lens;       // [rows]: each row's context length
  int64_t num_tokens, rows, table_stride, max_len;
};

// One linear layer, x [T, K] -> [T, N]: the quantized kernel into `out`, or the dense callback,
// whose output the Python side owns (and keeps until the next linear of the same kind). Returns
// where the output is; null if the callback raised.
static const char* run_linear(const PagedllmKernels* kn, const PagedllmQuantLinear& w,
                              int64_t index, const char* x, char* out, int64_t T) {
  if (w.qweight == nullptr) return static_cast<const char*>(kn->dense_linear(index, x));
  kn->quant_linear(reinterpret_cast<const float*>(x), w.qweight, w.scales, w.mins, w.bias,
                   reinterpret_cast<float*>(out), T, w.n, w.k);
  return out;
}

// Returns 0; or 1, 2, 3 when the rotary tables, the KV write or the attention kernel refused
// their input (a position, a slot, a block table entry out of range), having stopped there; 4
// when a dense linear's callback raised (the Python side holds the exception).
int pagedllm_decoder_forward(const PagedllmKernels* kn, const PagedllmLayer* layers,
                             const PagedllmShapes* s, const PagedllmStep* st) {
  const int64_t T = st->num_tokens, H = s->hidden, D = s->head_dim;
  const int64_t q_size = s->num_heads * D, kv_size = s->num_kv_heads * D;
  const int64_t qkv_size = q_size + 2 * kv_size, I = s->intermediate;
  const int bf16 = s->is_bf16 ? 1 : 0;
  const int64_t elt = bf16 ? 2 : 4;
  // scratch ledger (elements of the activations' dtype, each block T rows; ops/cpu_decoder.py
  // lays out the same one):
  //   h [H] | qkv [qkv_size] | q [q_size] | k [kv_size] | attn [q_size] | o [H]
  //   | gate_up [2 I] | act [I] | x [H] | r0 [H] | r1 [H]
  char* next = static_cast<char*>(st->scratch);
  auto take = [&](int64_t width) { char* p = next; next += T * width * elt; return p; };
  char* h = take(H);
  char* qkv = take(qkv_size);
  char* q = take(q_size);
  char* k = take(kv_size);
  char* attn = take(q_size);
  char* o = take(H);
  char* gate_up = take(2 * I);
  char* act = take(I);
  char* x = take(H);
  char* res[2] = {take(H), take(H)};
  const char* residual = static_cast<const char*>(st->x);  // layer 0: the embeddings themselves
  const char* in = residual;
  // NOTE: each residual add writes the buffer the current residual is not in: a norm reads
  // its residual row while writing the sum (layer 0 reads the embeddings, written nowhere).
  auto next_residual = [&](const char* r) { return r == res[0] ? res[1] : res[0]; };
  for (int64_t l = 0; l < s->num_layers; ++l) {
    const PagedllmLayer& L = layers[l];
    if (l == 0) {
      kn->rms_norm(in, nullptr, L.input_norm, h, nullptr, bf16, T, H, 1, H, 0, 0, 0, s->eps);
    } else {
      char* r = next_residual(residual);
      kn->rms_norm(in, residual, L.input_norm, h, r, bf16, T, H, 1, H, 0, H, 0, s->eps);
      residual = r;
    }
    const char* qkv_out = run_linear(kn, L.qkv, 4 * l, h, qkv, T);
    if (qkv_out == nullptr) return 4;
    if (kn->rotary(st->positions, qkv_out, qkv_out + q_size * elt, q, k, st->cos, st->sin, bf16,
                   T, s->num_heads, s->num_kv_heads, D, qkv_size, D, qkv_size, D, s->cs_stride,
                   s->num_positions))
      return 1;
    if (kn->kv_write(k, qkv_out + (q_size + kv_size) * elt, static_cast<char*>(L.key_cache),
                     static_cast<char*>(L.value_cache), st->slots, T, s->num_kv_heads, D * elt,
                     s->num_blocks * s->block_size, s->block_size, kv_size * elt, D * elt,
                     qkv_size * elt, D * elt, s->kv_block_stride * elt,
                     s->kv_token_stride * elt, s->kv_head_stride * elt))
      return 2;
    if (kn->attention(q, L.key_cache, L.value_cache, st->tables, st->lens, attn, bf16, st->rows,
                      s->num_heads, s->num_kv_heads, D, s->num_blocks, s->block_size, s->scale,
                      st->max_len, L.window > 0 ? L.window : st->max_len, q_size, D,
                      s->kv_block_stride, s->kv_token_stride, s->kv_head_stride,
                      st->table_stride))
      return 3;
    const char* o_out = run_linear(kn, L.o, 4 * l + 1, attn, o, T);
    if (o_out == nullptr) return 4;
    char* r = next_residual(residual);
    kn->rms_norm(o_out, residual, L.post_norm, h, r, bf16, T, H, 1, H, 0, H, 0, s->eps);
    residual = r;
    const char* gate_up_out = run_linear(kn, L.gate_up, 4 * l + 2, h, gate_up, T);
    if (gate_up_out == nullptr) return 4;
    kn->silu_and_mul(gate_up_out, act, bf16, T, I, 2 * I);
    in = run_linear(kn, L.down, 4 * l + 3, act, x, T);
    if (in == nullptr) return 4;
  }
  std::memcpy(st->hidden_out, in, T * H * elt);
  std::memcpy(st->residual_out, residual, T * H * elt);
  return 0;
}

}  // extern "C"
