"""GGUF checkpoints: metadata → HF config, tensors → HF names (de-quantized), metadata → tokenizer.

A `.gguf` file is one self-contained checkpoint:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key, type u32, value)                  the metadata: config, vocabulary, chat template
    n_tensors × (name, n_dims u32, dims u64[n], ggml_type u32, offset u64)
    padding to `general.alignment` (32)            ─┐
    tensor data, each at data_start + offset        ─┘ read lazily through a memory map

`gguf.GGUFReader` parses every one of the ~100k vocabulary strings into numpy views and takes
~4 s on the default model; the small reader below walks the same bytes in ~0.3 s. De-quantization
is the `gguf` package's (`gguf.quants.dequantize`), so every block type it knows is supported.
The tokenizer in the metadata is built by loader/gguf_tokenizer.py.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from pagedllm.loader.gguf_quants import dequantize_fast

logger = logging.getLogger(__name__)

# GGUF metadata value types (the spec's numbering) → struct format; 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# Types stored as plain values: yielded in their own dtype, like a safetensors checkpoint would be.
_PLAIN_DTYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                 GGMLQuantizationType.BF16: torch.bfloat16}

# general.architecture → (HF model_type, HF architecture). llama and qwen2 are the Llama block
# (qwen2's q/k/v biases arrive as ordinary `attn_{q,k,v}.bias` tensors); gemma3 is its own.
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}

# GGUF tensor names (llama.cpp's convention) → HF Llama names.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 normalises around both sublayers: llama.cpp's ffn_norm is its *pre*-feed-forward norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES_BY_ARCH = {"gemma3": _GEMMA3_LAYER_NAMES}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists dims fastest-first, i.e. reversed)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def arch(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key: `get("block_count")` reads `llama.block_count`."""
        return self.metadata.get(f"{self.arch}.{key}", default)


def read_gguf(path: str) -> GGUFFile:
    """Parse the metadata and tensor table of a GGUF file (no tensor data is read)."""
    st = os.stat(path)
    return _read_gguf_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size)


# NOTE: config, weights and tokenizer each ask for the header; one parse serves all three.
# Keyed on mtime/size so a rewritten file is parsed again.
@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _read_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, value_type)

        infos = []
        for _ in range(n_tensors):
            name, pos = _read_string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(ggml_type), offset))

    alignment = metadata.get("general.alignment", 32)
    data_start = -(-pos // alignment) * alignment  # round up to the alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(shape)) // block_size * type_size
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
    return GGUFFile(path, metadata, tensors)


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8:end].decode("utf-8", errors="replace"), end


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALAR_FORMATS:  # e.g. token_type: one unpack for the whole array
            fmt = f"<{count}{_SCALAR_FORMATS[item_type]}"
            return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
        items = []
        for _ in range(count):
            item, pos = _read_value(buf, pos, item_type)
            items.append(item)
        return items, pos
    fmt = "<" + _SCALAR_FORMATS[value_type]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


# ---------------------------------------------------------------------------------- config


def gguf_to_config(gguf: GGUFFile):
    """Build the transformers config that the GGUF metadata describes."""
    from transformers import AutoConfig

    if gguf.arch not in ARCHITECTURES:
        raise ValueError(f"{gguf.path}: GGUF architecture {gguf.arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    model_type, architecture = ARCHITECTURES[gguf.arch]

    def need(key: str) -> Any:
        value = gguf.get(key)
        if value is None:
            raise ValueError(f"{gguf.path}: metadata key {gguf.arch}.{key} is missing")
        return value

    hidden_size = need("embedding_length")
    num_heads = need("attention.head_count")
    num_kv_heads = gguf.get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts (DeciLM-style): not a Llama
        raise ValueError(f"{gguf.path}: per-layer attention.head_count_kv is not supported")
    rope_dim = gguf.get("rope.dimension_count")
    head_dim = gguf.get("attention.key_length") or rope_dim or hidden_size // num_heads
    if rope_dim is not None and rope_dim != head_dim:
        raise ValueError(f"{gguf.path}: partial rotary embeddings (rope.dimension_count "
                         f"{rope_dim} != head_dim {head_dim}) are not supported")
    # llama.cpp writes output.weight only when it differs from the token embedding.
    tied = "output.weight" not in gguf.tensors
    vocab_size = gguf.get("vocab_size") or gguf.tensors["token_embd.weight"].shape[0]
    md = gguf.metadata
    eos = md.get("tokenizer.ggml.eos_token_id")
    extra = _gemma3_config(gguf, hidden_size // num_heads, head_dim, eos) \
        if gguf.arch == "gemma3" else {}
    return AutoConfig.for_model(
        model_type,
        architectures=[architecture],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=gguf.get("rope.freq_base", 10000.0),  # llama.cpp's default when absent
        rope_scaling=_rope_scaling(gguf),
        max_position_embeddings=need("context_length"),
        tie_word_embeddings=tied,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=extra.pop("eos_token_id", eos),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        **extra,
    )


def _gemma3_config(gguf: GGUFFile, hidden_per_head: int, head_dim: int, eos: int | None) -> dict:
    """The Gemma 3 fields llama.cpp's loader fixes in code rather than reads from the file
    (each taken from the file when a newer converter writes it)."""
    tokens = gguf.metadata.get("tokenizer.ggml.tokens", [])
    # Chat turns end with <end_of_turn>: an end of generation beside <eos>, as in Gemma's own
    # generation_config and llama.cpp's end-of-generation tokens.
    eos_ids = [eos] + ([tokens.index("<end_of_turn>")] if "<end_of_turn>" in tokens else [])
    return dict(
        eos_token_id=eos_ids,
        sliding_window=gguf.get("attention.sliding_window"),
        rope_local_base_freq=float(gguf.get("rope.freq_base_swa", 10000.0)),  # local layers
        # 1 / sqrt(head_dim), except the 27B model (62 layers): 1 / sqrt(hidden / heads)
        query_pre_attn_scalar=hidden_per_head if gguf.get("block_count") == 62 else head_dim,
        final_logit_softcapping=gguf.get("final_logit_softcapping"),
        attn_logit_softcapping=gguf.get("attn_logit_softcapping"),
    )


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    kind = gguf.get("rope.scaling.type")
    factor = gguf.get("rope.scaling.factor")
    if kind is None and gguf.get("rope.scale_linear") is not None:  # pre-2024 files
        kind, factor = "linear", gguf.get("rope.scale_linear")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if (orig := gguf.get("rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        # NOTE: rope.scaling.attn_factor is not mapped: llama.cpp multiplies it into YaRN's
        # default magnitude scale, while HF's attention_factor replaces that scale.
        return scaling
    raise ValueError(f"{gguf.path}: rope scaling type {kind!r} is not supported")


# --------------------------------------------------------------------------------- weights


def iter_gguf_weights(gguf: GGUFFile, config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor [out, in]) one tensor at a time.

    Quantized tensors come out de-quantized to float32; F32/F16/BF16 keep their dtype.
    """
    # One read-only map of the whole file; each tensor is a slice of it, paged in on use.
    # NOTE: asarray drops the np.memmap subclass (same buffer): its per-view bookkeeping made
    # gguf's block-wise de-quantization ~1.6x slower.
    blob = np.asarray(np.memmap(gguf.path, dtype=np.uint8, mode="r"))
    quantized = Counter(i.ggml_type.name for i in gguf.tensors.values()
                        if i.ggml_type not in _PLAIN_DTYPES)
    if quantized:
        logger.info("de-quantizing %d GGUF tensors to float32 (%s)", sum(quantized.values()),
                    ", ".join(f"{n} {kind}" for kind, n in quantized.most_common()))
    for info in gguf.tensors.values():
        name = _hf_name(info.name, gguf.arch)
        if name is None:
            # rope_freqs.weight: llama3-style per-dimension rope factors, which the config
            # cannot express; transformers drops it too, so outputs drift from llama.cpp's.
            logger.warning("%s: skipping GGUF tensor %s (not supported)", gguf.path, info.name)
            continue
        tensor = _load_tensor(blob, info)
        if gguf.arch == "gemma3" and name.endswith("norm.weight"):
            # NOTE: llama.cpp's converter stores Gemma's (1 + w) norm scales with the 1 added;
            # HF's Gemma RMSNorm adds it itself.
            tensor = tensor - 1
        elif gguf.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_rope_rows(tensor, config.num_attention_heads)
        elif gguf.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_rope_rows(tensor, config.num_key_value_heads)
        yield name, tensor


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if m := _LAYER_RE.fullmatch(gguf_name):
        layer, part, suffix = m.groups()
        names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
        if part not in names:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{names[part]}.{suffix}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def _load_tensor(blob: np.ndarray, info: GGUFTensorInfo) -> torch.Tensor:
    raw = blob[info.offset:info.offset + info.nbytes]
    if info.ggml_type in _PLAIN_DTYPES:
        # np.array copies out of the read-only map; torch reinterprets the bytes (no bf16 in numpy).
        data = torch.from_numpy(np.array(raw))
        return data.view(_PLAIN_DTYPES[info.ggml_type]).reshape(info.shape)
    # Block types: rows of packed blocks in, rows of float32 values out.
    fast = dequantize_fast(raw, info.ggml_type, info.shape)
    if fast is not None:
        return torch.from_numpy(fast)
    rows = raw.reshape(quant_shape_to_byte_shape(info.shape, info.ggml_type))
    return torch.from_numpy(dequantize(rows, info.ggml_type))


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, giving back HF's rotate-half layout.

    HF orders each head's rows as [first halves of the rotary pairs | second halves];
    llama.cpp's converter interleaves them (pair i → rows 2i, 2i+1) for its GPT-J style rope:

        HF   (head h): x0 x1 ... x(d/2-1) | y0 y1 ... y(d/2-1)
        GGUF (head h): x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)
    """
    rest = w.shape[1:]
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()
