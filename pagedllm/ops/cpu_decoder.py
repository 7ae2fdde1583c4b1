"""A Llama decoder stack in one C++ call on a CPU (csrc/decoder_cpu.cpp), for a model whose linear
layers are quantized (`--quantization`).

With 4-bit weights a decode step at batch 1 reads ~100 MB and its matmuls take ~4 ms; the
modules around them made ~20 Python-side calls per layer (norms, rotary, the KV write,
attention, four matmuls, each with its checks and allocations), ~6 ms more over 30 layers. Here
the layer loop runs in C++ and calls the same kernels with the same arguments, so its results
are the module path's bit for bit (tests/ops/test_cpu_decoder.py), batch invariance included.

It takes a forward pass when everything the module path would do is one of those kernels:
  - the model: LlamaModel's own layers (llama.py checks the classes), one TP rank, no q/k norm,
    full rotary, no bias but q/k/v's, fp32 weights and norms;
  - every q/k/v, o, gate/up and down weight quantized (ops/quant_linear.py);
  - the KV cache in fp32 (no scales) and taken by the C++ attention kernel, the fused layer ops
    on (ops/fused.py), the kernel libraries built;
  - decode, or prompts and chunks where the module path sends them through the C++ kernel too
    (ops/backend.py: batch-invariant mode, or PAGEDLLM_CPU_PREFILL_KERNEL unset).
Anything else returns None and the modules run. PAGEDLLM_CPU_DECODER=0 turns it off (read at
import; `set_enabled` for tests and benchmarks).
"""

from __future__ import annotations

import ctypes
import operator
import os

import torch

from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.forward_context import get_attention_metadata
from pagedllm.ops import backend, batch_invariant, cpu_kernels, cpu_layer_ops, fused, quant_linear
from pagedllm.ops.cpu_build import CppLibrary
from pagedllm.ops.quant_linear import QuantizedWeight

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
_enabled = os.environ.get("PAGEDLLM_CPU_DECODER", "1") != "0"


# ctypes mirrors of csrc/decoder_cpu.cpp's structures, field for field
class _Kernels(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in (
        "quant_linear", "rms_norm", "silu_and_mul", "rotary", "kv_write", "attention")]


class _QuantLinear(ctypes.Structure):
    _fields_ = [("qweight", _ptr), ("scales", _ptr), ("mins", _ptr), ("bias", _ptr),
                ("n", _i64), ("k", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _QuantLinear),
                ("o", _QuantLinear), ("gate_up", _QuantLinear), ("down", _QuantLinear),
                ("key_cache", _ptr), ("value_cache", _ptr), ("window", _i64)]


class _Shapes(ctypes.Structure):
    _fields_ = [(name, _i64) for name in (
        "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate",
        "num_blocks", "block_size", "kv_block_stride", "kv_token_stride", "kv_head_stride",
        "num_positions", "cs_stride")] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Step(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in (
        "x", "hidden_out", "residual_out", "scratch", "positions", "slots", "cos", "sin",
        "tables", "lens")] + [(name, _i64) for name in (
            "num_tokens", "rows", "table_stride", "max_len")]


def _declare(lib: ctypes.CDLL) -> None:
    lib.pagedllm_decoder_forward.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Layer),
                                             ctypes.POINTER(_Shapes), ctypes.POINTER(_Step)]
    lib.pagedllm_decoder_forward.restype = ctypes.c_int


_LIBRARY = CppLibrary("pagedllm_cpu_decoder", "decoder_cpu.cpp", "CPU decoder stack", _declare)
_ERRORS = {1: "a position is out of the rotary tables' {}",
           2: "a slot of the slot mapping is past the cache",
           3: "a block table entry of a used block is out of range"}


def set_enabled(enabled: bool) -> None:
    """Run (or stop running) the stack for passes from now on."""
    global _enabled
    _enabled = bool(enabled)


def _kernels() -> _Kernels | None:
    """The entry points of the kernel libraries, or None if one of them is unavailable."""
    if not (_LIBRARY.load() and quant_linear.load() and cpu_layer_ops.load()
            and cpu_kernels.load()):
        return None

    def address(lib: ctypes.CDLL, name: str) -> int:
        return ctypes.cast(getattr(lib, name), _ptr).value

    ql, ops, attn = quant_linear._LIBRARY.lib, cpu_layer_ops._LIBRARY.lib, cpu_kernels._LIBRARY.lib
    return _Kernels(address(ql, "pagedllm_quant_linear"), address(ops, "pagedllm_rms_norm"),
                    address(ops, "pagedllm_silu_and_mul"),
                    address(ops, "pagedllm_rotary_embedding"),
                    address(attn, "pagedllm_reshape_and_cache"),
                    address(attn, "pagedllm_paged_decode_attention"))


def _quant(linear: torch.nn.Module, bias_ok: bool) -> _QuantLinear | None:
    qw, bias = getattr(linear, "packed_weight", None), getattr(linear, "bias", None)
    if not isinstance(qw, QuantizedWeight) or (bias is not None and not bias_ok):
        return None
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return None
    q, d, m = qw.pointers
    return _QuantLinear(q, d, m, None if bias is None else bias.data_ptr(), *qw.shape)


def _fp32_vector(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()


class DecoderStack:
    """Every layer of a LlamaModel (llama.py built it for `layers` after checking their
    classes) in one call: `stack(positions, hidden)` gives the loop's (hidden, residual), or
    None when this pass is not one the stack takes (the module path runs then)."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.layers = layers
        # The structures the C++ reads, worked out again whenever a KV cache or a prepared
        # weight is another object than at the last build; `_bound` holds those objects, so no
        # pointer of the table outlives its memory. (Norm weights and biases are parameters,
        # read at the build: the engine never replaces them after loading.)
        self._bound: list[object] = []
        self._table: tuple[_Kernels, ctypes.Array, _Shapes, tuple] | None = None
        # NOTE: plain attributes read per pass: nn.Module's __getattr__ on 2 x 30 submodules
        # cost ~60 us a pass
        self._attns = [layer.self_attn.attn for layer in layers]
        self._linears = [m for layer in layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)]

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not (_enabled and hidden.dtype == torch.float32 and hidden.is_cpu
                and fused.is_enabled() and backend.forced_backend() is None):
            return None
        bound = [a.kv_cache for a in self._attns] + [m.packed_weight for m in self._linears]
        if len(bound) != len(self._bound) or any(map(operator.is_not, bound, self._bound)):
            self._table, self._bound = self._build(), bound
        if self._table is None:
            return None
        kernels, layer_table, shapes, cos_sin = self._table
        meta = get_attention_metadata()
        num_tokens = hidden.shape[0]
        if (meta.max_seq_len is None or not hidden.is_contiguous() or hidden.dim() != 2
                or hidden.shape[1] != shapes.hidden):
            return None
        if meta.is_decode_only:
            tables, lens = meta.block_tables, meta.seq_lens
        elif batch_invariant.enabled or backend.cpu_prefill_kernel():
            rows, tables, lens = cpu_kernels.prompt_rows(meta.block_tables, meta.query_start_loc,
                                                         meta.seq_lens)
            if rows != num_tokens:  # padded rows: the module path handles them
                return None
        else:
            return None
        tables, lens, max_len = cpu_kernels.kernel_tables(tables, lens, shapes.block_size,
                                                          meta.max_seq_len)
        if tables.shape[0] != lens.shape[0] or (meta.is_decode_only
                                                and lens.shape[0] != num_tokens):
            return None
        if positions.dtype != torch.int64 or not positions.is_contiguous():
            positions = positions.to(torch.int64).contiguous()
        slots = cpu_kernels.kernel_slots(meta.slot_mapping)
        if not slots.shape[0] == positions.shape[0] == num_tokens:  # the C++ reads T of each
            raise ValueError(f"{slots.shape[0]} slots and {positions.shape[0]} positions for "
                             f"{num_tokens} tokens")
        h, qkv = shapes.hidden, (shapes.num_heads + 2 * shapes.num_kv_heads) * shapes.head_dim
        q, kv, inter = shapes.num_heads * shapes.head_dim, shapes.num_kv_heads * shapes.head_dim, \
            shapes.intermediate
        scratch = torch.empty(num_tokens * (5 * h + qkv + 2 * q + kv + 3 * inter),
                              dtype=torch.float32)
        out, residual = torch.empty_like(hidden), torch.empty_like(hidden)
        cos, sin = cos_sin
        step = _Step(hidden.data_ptr(), out.data_ptr(), residual.data_ptr(), scratch.data_ptr(),
                     positions.data_ptr(), slots.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     tables.data_ptr(), lens.data_ptr(), num_tokens, tables.shape[0],
                     tables.stride(0), max_len)
        if num_tokens:
            bad = _LIBRARY.lib.pagedllm_decoder_forward(kernels, layer_table, shapes, step)
            if bad:
                raise IndexError(_ERRORS[bad].format(shapes.num_positions))
        return out, residual

    def _build(self) -> tuple[_Kernels, ctypes.Array, _Shapes, tuple] | None:
        """The kernels, the per-layer table and the shapes, or None if these layers, weights
        and caches are not all what the stack runs (the module docstring's list)."""
        if not self.layers or get_tp_size() != 1:
            return None
        first = self.layers[0].self_attn
        cache = first.attn.kv_cache
        if cache is None or cache.dtype != torch.float32 or cache.stride(-1) != 1:
            return None
        rotary = first.rotary_emb
        if not (rotary.rotary_dim == rotary.head_dim and rotary.cos_cache.is_contiguous()
                and rotary.cos_cache.dtype == torch.float32
                and rotary.sin_cache.stride() == rotary.cos_cache.stride()
                and rotary.sin_cache.dtype == torch.float32):
            return None
        rows: list[_Layer] = []
        eps = self.layers[0].input_layernorm.eps
        down = getattr(self.layers[0].mlp.down_proj, "packed_weight", None)
        if not isinstance(down, QuantizedWeight):
            return None
        hidden, inter = down.shape
        q_size, kv_size = first.q_size, first.kv_size
        # (N, K) of q/k/v, o, gate/up and down
        expected = [(q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden),
                  (hidden, inter)]
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            kv = attn.attn.kv_cache
            if (attn.q_norm is not None or attn.attn.kv_scales is not None or kv is None
                    or kv.shape != cache.shape or kv.stride() != cache.stride()
                    or kv.dtype != cache.dtype
                    or attn.attn.num_heads != first.attn.num_heads
                    or attn.attn.num_kv_heads != first.attn.num_kv_heads
                    or attn.attn.scale != first.attn.scale
                    or attn.rotary_emb.signature != rotary.signature
                    or any(n.eps != eps or not _fp32_vector(n.weight) for n in norms)):
                return None
            linears = (_quant(attn.qkv_proj, True), _quant(attn.o_proj, False),
                       _quant(mlp.gate_up_proj, False), _quant(mlp.down_proj, False))
            if any(lin is None for lin in linears) \
                    or [(lin.n, lin.k) for lin in linears] != expected:
                return None
            rows.append(_Layer(norms[0].weight.data_ptr(), norms[1].weight.data_ptr(),
                               *linears, kv[0].data_ptr(), kv[1].data_ptr(),
                               attn.attn.sliding_window or 0))
        kernels = _kernels()
        if kernels is None:
            return None
        num_blocks, block_size, num_kv_heads, head_dim = cache.shape[1:]
        shapes = _Shapes(len(rows), hidden, first.attn.num_heads, num_kv_heads, head_dim, inter,
                         num_blocks, block_size, *cache[0].stride()[:3],
                         rotary.cos_cache.shape[0], rotary.cos_cache.stride(0), eps,
                         first.attn.scale)
        return kernels, (_Layer * len(rows))(*rows), shapes, (rotary.cos_cache, rotary.sin_cache)
