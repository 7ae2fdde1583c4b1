"""A Llama decoder stack in one C++ call on a CPU (csrc/decoder_cpu.cpp).

With 4-bit weights a decode step at batch 1 reads ~100 MB and its matmuls take ~4 ms; the
modules around them made ~20 Python-side calls per layer (norms, rotary, the KV write,
attention, four matmuls, each with its checks and allocations), ~6 ms more over 30 layers. Here
the layer loop runs in C++ and calls the same kernels with the same arguments, so its results
are the module path's bit for bit (tests/ops/test_cpu_decoder.py), batch invariance included.
Quantized weights take the C++ quantized matmul; fp32 and bf16 weights a callback into Python
that runs the linear module's own forward (ops.gemm.linear: oneDNN's packed GEMM, which has no
C entry point, or what else gemm.py picks for the row count) on the stack's buffer: 4 Python
calls a layer instead of ~20. The engine registers no module hooks, so forward is what the
module path's call runs.

It takes a forward pass when everything the module path would do is one of those kernels:
  - the model: LlamaModel's own layers (llama.py checks the classes), one TP rank, no q/k norm,
    full rotary, fp32 rotary tables;
  - activations, norm weights and the KV cache (no scales) all fp32, or all bf16;
  - every q/k/v, o, gate/up and down weight quantized (ops/quant_linear.py: fp32 activations,
    no bias but q/k/v's), or none of them (weights in the activations' dtype);
  - the C++ attention kernel taking the cache, the fused layer ops on (ops/fused.py), the
    kernel libraries built;
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
        "quant_linear", "rms_norm", "silu_and_mul", "rotary", "kv_write", "attention",
        "dense_linear")]


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
        "num_positions", "cs_stride", "is_bf16")] + [("eps", ctypes.c_float),
                                                      ("scale", ctypes.c_float)]


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
# const void* dense_linear(int64_t index, const void* x): the output's address, or null (raised)
_DENSE_LINEAR = ctypes.CFUNCTYPE(_ptr, _i64, _ptr)
_DTYPES = (torch.float32, torch.bfloat16)
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
    """The quantized weight's blocks, a null one (the dense callback) for a weight that is not
    quantized (_build checks its dtype), or None where the quantized kernel cannot take it."""
    qw, bias = getattr(linear, "packed_weight", None), getattr(linear, "bias", None)
    if not isinstance(qw, QuantizedWeight):
        return _QuantLinear(None, None, None, None, *linear.weight.shape)
    if bias is not None and not bias_ok:
        return None
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return None
    q, d, m = qw.pointers
    return _QuantLinear(q, d, m, None if bias is None else bias.data_ptr(), *qw.shape)


def _vector(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.dim() == 1 and t.is_contiguous()


class DecoderStack:
    """Every layer of a LlamaModel (llama.py built it for `layers` after checking their
    classes) in one call: `stack(positions, hidden)` gives the loop's (hidden, residual), or
    None when this pass is not one the stack takes (the module path runs then). One pass at a
    time (the engine runs one forward at a time): the scratch and the callback's state are the
    instance's."""

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
        # The dense callback's state for the pass in flight: each linear's input, a view of the
        # scratch (qkv and gate/up read h, o reads attn, down reads act), and its last output,
        # held until the next linear of its kind (the C++ reads it until then).
        self._dense_linear = _DENSE_LINEAR(self._run_dense)
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor | None] = [None] * 4
        self._error: BaseException | None = None
        # NOTE: one scratch kept between passes, grown when a pass needs more: a fresh one a
        # pass (tens of MB for a 2,048-token chunk) was fresh pages, faulted in on every touch
        self._scratch_buffer = torch.empty(0)

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not (_enabled and hidden.dtype in _DTYPES and hidden.is_cpu
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
                or hidden.shape[1] != shapes.hidden
                or hidden.dtype != (torch.bfloat16 if shapes.is_bf16 else torch.float32)):
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
        scratch = self._scratch(shapes, num_tokens, hidden.dtype)
        out, residual = torch.empty_like(hidden), torch.empty_like(hidden)
        cos, sin = cos_sin
        step = _Step(hidden.data_ptr(), out.data_ptr(), residual.data_ptr(), scratch.data_ptr(),
                     positions.data_ptr(), slots.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     tables.data_ptr(), lens.data_ptr(), num_tokens, tables.shape[0],
                     tables.stride(0), max_len)
        if num_tokens:
            try:
                bad = _LIBRARY.lib.pagedllm_decoder_forward(kernels, layer_table, shapes, step)
            finally:
                self._inputs, self._outputs = [], [None] * 4
            if bad == 4:
                error, self._error = self._error, None
                raise error
            if bad:
                raise IndexError(_ERRORS[bad].format(shapes.num_positions))
        return out, residual

    def _scratch(self, shapes: _Shapes, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """The C++ ledger's buffers (csrc/decoder_cpu.cpp), and the views of it that the dense
        linears read."""
        h, t = shapes.hidden, num_tokens
        q, kv = shapes.num_heads * shapes.head_dim, shapes.num_kv_heads * shapes.head_dim
        qkv, inter = q + 2 * kv, shapes.intermediate
        widths = [h, qkv, q, kv, q, h, 2 * inter, inter, h, h, h]  # h .. attn .. act .. r1
        size = t * sum(widths)
        if self._scratch_buffer.dtype != dtype or self._scratch_buffer.numel() < size:
            self._scratch_buffer = torch.empty(size, dtype=dtype)
        scratch = self._scratch_buffer[:size]
        starts = [t * sum(widths[:i]) for i in range(len(widths))]

        def view(i: int) -> torch.Tensor:
            return scratch[starts[i]:starts[i] + t * widths[i]].view(t, widths[i])

        self._inputs = [view(0), view(4), view(0), view(7)]  # h, attn, h, act
        return scratch

    def _run_dense(self, index: int, x: int) -> int | None:
        """The C++ stack's dense linear `index` (4 per layer): the module's own forward on its
        input, a view of the scratch; the output's address, or None after an exception (kept
        for __call__ to raise: ctypes would only print it)."""
        try:
            kind = index & 3
            src = self._inputs[kind]
            if src.data_ptr() != x:
                raise RuntimeError(f"decoder stack: linear {index} reads {x:#x}, not the "
                                   f"scratch view at {src.data_ptr():#x}")
            linear = self._linears[index]
            y = linear.forward(src)
            # the C++ reads [T, N] rows in the activations' dtype (a bias of another dtype
            # would have promoted them)
            if y.dtype != src.dtype or y.shape != (src.shape[0], linear.weight.shape[0]):
                raise RuntimeError(f"decoder stack: linear {index} gave {tuple(y.shape)} "
                                   f"{y.dtype} for {tuple(src.shape)} {src.dtype} rows")
            if not y.is_contiguous():
                y = y.contiguous()
            self._outputs[kind] = y
            return y.data_ptr()
        except BaseException as e:  # noqa: BLE001 - re-raised by __call__
            self._error = e
            return None

    def _build(self) -> tuple[_Kernels, ctypes.Array, _Shapes, tuple] | None:
        """The kernels, the per-layer table and the shapes, or None if these layers, weights
        and caches are not all what the stack runs (the module docstring's list)."""
        if not self.layers or get_tp_size() != 1:
            return None
        first = self.layers[0].self_attn
        cache = first.attn.kv_cache
        if cache is None or cache.dtype not in _DTYPES or cache.stride(-1) != 1:
            return None
        dtype = cache.dtype
        rotary = first.rotary_emb
        if not (rotary.rotary_dim == rotary.head_dim and rotary.cos_cache.is_contiguous()
                and rotary.cos_cache.dtype == torch.float32
                and rotary.sin_cache.stride() == rotary.cos_cache.stride()
                and rotary.sin_cache.dtype == torch.float32):
            return None
        rows: list[_Layer] = []
        eps = self.layers[0].input_layernorm.eps
        hidden, inter = self.layers[0].mlp.down_proj.weight.shape[0], \
            self.layers[0].mlp.down_proj.weight.shape[1]
        q_size, kv_size = first.q_size, first.kv_size
        # (N, K) of q/k/v, o, gate/up and down
        expected = [(q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden),
                    (hidden, inter)]
        quantized = isinstance(self.layers[0].mlp.down_proj.packed_weight, QuantizedWeight)
        if quantized and dtype != torch.float32:  # the quantized kernel takes fp32 activations
            return None
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
                    or any(n.eps != eps or not _vector(n.weight, dtype) for n in norms)):
                return None
            modules = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            linears = (_quant(attn.qkv_proj, True), _quant(attn.o_proj, False),
                       _quant(mlp.gate_up_proj, False), _quant(mlp.down_proj, False))
            if any(lin is None or bool(lin.qweight) != quantized for lin in linears) \
                    or [(lin.n, lin.k) for lin in linears] != expected \
                    or not (quantized or all(m.weight.dtype == dtype and (
                        m.bias is None or m.bias.dtype == dtype) for m in modules)):
                return None
            rows.append(_Layer(norms[0].weight.data_ptr(), norms[1].weight.data_ptr(),
                               *linears, kv[0].data_ptr(), kv[1].data_ptr(),
                               attn.attn.sliding_window or 0))
        kernels = _kernels()
        if kernels is None:
            return None
        kernels.dense_linear = ctypes.cast(self._dense_linear, _ptr).value
        num_blocks, block_size, num_kv_heads, head_dim = cache.shape[1:]
        shapes = _Shapes(len(rows), hidden, first.attn.num_heads, num_kv_heads, head_dim, inter,
                         num_blocks, block_size, *cache[0].stride()[:3],
                         rotary.cos_cache.shape[0], rotary.cos_cache.stride(0),
                         dtype == torch.bfloat16, eps, first.attn.scale)
        return kernels, (_Layer * len(rows))(*rows), shapes, (rotary.cos_cache, rotary.sin_cache)
