"""Rotary position embedding (RoPE), HF's non-interleaved "rotate half" convention.

cos/sin are precomputed for every position up to max_position in fp32, exactly as HF computes
them per call (same inv_freq formula, same fp32 product), so outputs match bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagedllm.forward_context import per_pass
from pagedllm.ops import fused


def _inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by `factor`,
    short ones kept, and the band between is interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_config(hf_config) -> tuple[float, dict | None]:
    """(theta, scaling) from a HF config: transformers 5 keeps both in `rope_parameters`,
    older versions in `rope_theta` and `rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(params.get("rope_theta", 10000.0)), scaling
    return float(getattr(hf_config, "rope_theta", 10000.0)), getattr(hf_config, "rope_scaling", None)


def partial_rotary_factor(hf_config) -> float:
    """The share of each head that RoPE turns (Phi-3.5/Phi-4-mini: 0.75); 1.0 for most."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor",
                            getattr(hf_config, "partial_rotary_factor", None) or 1.0))


class RotaryEmbedding(nn.Module):
    """RoPE over the first `rotary_dim` features of each head (all of them by default); the
    rest pass through unchanged, as in HF's partial rotary (Phi-3)."""

    def __init__(
        self, head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        assert self.rotary_dim % 2 == 0 and self.rotary_dim <= head_dim
        inv_freq = _inv_freq(self.rotary_dim, base)
        kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        elif kind == "linear":
            inv_freq = inv_freq / rope_scaling["factor"]
        elif kind != "default":
            raise NotImplementedError(f"rope scaling type {kind!r} is not supported")
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = t[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        # Equal signatures give equal tables (the memo in _cos_sin shares them across layers)
        self.signature = (self.rotary_dim, max_position, base, repr(sorted(
            (rope_scaling or {}).items())), kind)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D]
        if self.rotary_dim < self.head_dim:
            r = self.rotary_dim
            q_rot, k_rot = self._rotate(positions, q[..., :r], k[..., :r])
            return torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
        return self._rotate(positions, q, k)

    def _rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if fused.use_fused(q):  # q and k in one fused op (ops/fused.py), indexing the tables
            # itself; equal to the code below within one rounding
            return fused.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
        cos, sin = self._cos_sin(positions, q.dtype)  # [T, 1, D] each
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        def gather():
            return (self.cos_cache[positions].unsqueeze(1).to(dtype),
                    self.sin_cache[positions].unsqueeze(1).to(dtype))

        if positions.device.type != "cpu":
            return gather()
        # Every layer of a step turns the same positions tensor with equal tables (equal
        # signatures), so on CPU a forward pass gathers and casts them once, not in each layer
        # (6 small ops per layer).
        return per_pass(("rope", self.signature, dtype), (positions,), gather)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
