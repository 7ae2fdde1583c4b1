// A Llama decoder stack in one call, for a CPU model whose linear layers are quantized
// (ops/cpu_decoder.py says when it runs). Each layer is the model file's sequence of ops:
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
// few microseconds, which at decode batch 1 cost more than the layer's arithmetic.

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
};

struct PagedllmQuantLinear {  // one quantized weight [N, K] (ops/quant_linear.py's blocks)
  const void* qweight;
  const uint16_t* scales;
  const uint16_t* mins;  // null: q8_0
  const float* bias;     // null: none
  int64_t n, k;
};

struct PagedllmLayer {
  const float* input_norm;  // [hidden]
  const float* post_norm;   // [hidden]
  PagedllmQuantLinear qkv, o, gate_up, down;
  float* key_cache;    // [num_blocks, block_size, Hkv, D]
  float* value_cache;  // same strides
  int64_t window;      // the sliding window, or 0: none
};

struct PagedllmShapes {
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
  int64_t num_blocks, block_size, kv_block_stride, kv_token_stride, kv_head_stride;
  int64_t num_positions, cs_stride;
  float eps, scale;
};

struct PagedllmStep {
  const float* x;           // [T, hidden]: the embeddings (also layer 0's residual)
  float* hidden_out;        // [T, hidden]: the last layer's output
  float* residual_out;      // [T, hidden]: the residual beside it
  float* scratch;           // see the ledger in pagedllm_decoder_forward
  const int64_t* positions;  // [T]
  const int64_t* slots;      // [T]
  const float* cos;          // [num_positions, D]
  const float* sin;
  const int32_t* tables;     // [rows, width]: one block table per attention row
  const int32_t* lens;       // [rows]: each row's context length
  int64_t num_tokens, rows, table_stride, max_len;
};

// Returns 0; or 1, 2, 3 when the rotary tables, the KV write or the attention kernel refused
// their input (a position, a slot, a block table entry out of range), having stopped there.
int pagedllm_decoder_forward(const PagedllmKernels* kn, const PagedllmLayer* layers,
                             const PagedllmShapes* s, const PagedllmStep* st) {
  const int64_t T = st->num_tokens, H = s->hidden, D = s->head_dim;
  const int64_t q_size = s->num_heads * D, kv_size = s->num_kv_heads * D;
  const int64_t qkv_size = q_size + 2 * kv_size, I = s->intermediate;
  // scratch ledger (floats, each block T rows):
  //   h [H] | qkv [qkv_size] | q [q_size] | k [kv_size] | attn [q_size] | o [H]
  //   | gate_up [2 I] | act [I] | x [H] | r0 [H] | r1 [H]
  float* h = st->scratch;
  float* qkv = h + T * H;
  float* q = qkv + T * qkv_size;
  float* k = q + T * q_size;
  float* attn = k + T * kv_size;
  float* o = attn + T * q_size;
  float* gate_up = o + T * H;
  float* act = gate_up + T * 2 * I;
  float* x = act + T * I;
  float* res[2] = {x + T * H, x + 2 * T * H};
  const float* residual = st->x;  // layer 0: the embeddings themselves
  const float* in = st->x;
  const int64_t elt = sizeof(float);
  // NOTE: each residual add writes the buffer the current residual is not in: a norm reads
  // its residual row while writing the sum (layer 0 reads the embeddings, written nowhere).
  auto next_residual = [&](const float* r) { return r == res[0] ? res[1] : res[0]; };
  for (int64_t l = 0; l < s->num_layers; ++l) {
    const PagedllmLayer& L = layers[l];
    if (l == 0) {
      kn->rms_norm(in, nullptr, L.input_norm, h, nullptr, 0, T, H, 1, H, 0, 0, 0, s->eps);
    } else {
      float* r = next_residual(residual);
      kn->rms_norm(in, residual, L.input_norm, h, r, 0, T, H, 1, H, 0, H, 0, s->eps);
      residual = r;
    }
    kn->quant_linear(h, L.qkv.qweight, L.qkv.scales, L.qkv.mins, L.qkv.bias, qkv, T, L.qkv.n,
                     L.qkv.k);
    if (kn->rotary(st->positions, qkv, qkv + q_size, q, k, st->cos, st->sin, 0, T, s->num_heads,
                   s->num_kv_heads, D, qkv_size, D, qkv_size, D, s->cs_stride, s->num_positions))
      return 1;
    if (kn->kv_write(reinterpret_cast<const char*>(k),
                     reinterpret_cast<const char*>(qkv + q_size + kv_size),
                     reinterpret_cast<char*>(L.key_cache), reinterpret_cast<char*>(L.value_cache),
                     st->slots, T, s->num_kv_heads, D * elt, s->num_blocks * s->block_size,
                     s->block_size, kv_size * elt, D * elt, qkv_size * elt, D * elt,
                     s->kv_block_stride * elt, s->kv_token_stride * elt,
                     s->kv_head_stride * elt))
      return 2;
    if (kn->attention(q, L.key_cache, L.value_cache, st->tables, st->lens, attn, 0, st->rows,
                      s->num_heads, s->num_kv_heads, D, s->num_blocks, s->block_size, s->scale,
                      st->max_len, L.window > 0 ? L.window : st->max_len, q_size, D,
                      s->kv_block_stride, s->kv_token_stride, s->kv_head_stride,
                      st->table_stride))
      return 3;
    kn->quant_linear(attn, L.o.qweight, L.o.scales, L.o.mins, nullptr, o, T, L.o.n, L.o.k);
    float* r = next_residual(residual);
    kn->rms_norm(o, residual, L.post_norm, h, r, 0, T, H, 1, H, 0, H, 0, s->eps);
    residual = r;
    kn->quant_linear(h, L.gate_up.qweight, L.gate_up.scales, L.gate_up.mins, nullptr, gate_up,
                     T, L.gate_up.n, L.gate_up.k);
    kn->silu_and_mul(gate_up, act, 0, T, I, 2 * I);
    kn->quant_linear(act, L.down.qweight, L.down.scales, L.down.mins, nullptr, x, T, L.down.n,
                     L.down.k);
    in = x;
  }
  std::memcpy(st->hidden_out, in, T * H * elt);
  std::memcpy(st->residual_out, residual, T * H * elt);
  return 0;
}

}  // extern "C"
