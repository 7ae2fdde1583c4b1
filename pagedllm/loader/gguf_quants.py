"""Whole-tensor de-quantization of the GGUF block types the default model uses.

gguf's own `dequantize` walks a tensor in small groups of rows; on the default model (210 Q4_1
tensors) that was ~30% of `LLM()` start-up. These do each tensor in a few vectorized passes and
give the same float32 values bit for bit (tests/loader/test_gguf_quants.py); any other type
goes to gguf's.

    block of 32 weights   bytes                                   weight i
    Q4_0  (18 bytes)      d: f16 | qs: 16 x u8 (two nibbles)       d * (nibble_i - 8)
    Q4_1  (20 bytes)      d: f16 | m: f16 | qs: 16 x u8            d * nibble_i + m
    Q8_0  (34 bytes)      d: f16 | qs: 32 x i8                     d * qs_i
  nibble_i = qs[i] & 0xF for i < 16, qs[i - 16] >> 4 for i >= 16 (low halves first)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType


def _scale(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte `at` of every block, as a float32 column [N, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles_times(blocks: np.ndarray, first: int, d: np.ndarray, offset: int) -> np.ndarray:
    """[N, 32] float32: d * (nibble - offset) for the 16 bytes of nibbles from byte `first`."""
    qs = blocks[:, first:first + 16]
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    lo, hi = qs & 0xF, qs >> 4
    if offset:
        lo, hi = lo.astype(np.int8) - np.int8(offset), hi.astype(np.int8) - np.int8(offset)
    np.multiply(d, lo, out=out[:, :16])
    np.multiply(d, hi, out=out[:, 16:])
    return out


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return _nibbles_times(blocks, 2, _scale(blocks, 0), 8)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles_times(blocks, 4, _scale(blocks, 0), 0)
    out += _scale(blocks, 2)
    return out


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * blocks[:, 2:].view(np.int8)


_BLOCKS: dict[GGMLQuantizationType, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    GGMLQuantizationType.Q4_0: (18, _q4_0),
    GGMLQuantizationType.Q4_1: (20, _q4_1),
    GGMLQuantizationType.Q8_0: (34, _q8_0),
}


def dequantize_fast(raw: np.ndarray, ggml_type: GGMLQuantizationType,
                    shape: tuple[int, ...]) -> np.ndarray | None:
    """float32 values of shape `shape` from the tensor's bytes `raw` (uint8), or None for a
    type not handled here."""
    if ggml_type not in _BLOCKS:
        return None
    block_bytes, dequant = _BLOCKS[ggml_type]
    return dequant(raw.reshape(-1, block_bytes)).reshape(shape)
