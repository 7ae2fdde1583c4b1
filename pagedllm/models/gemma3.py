"""Gemma 3 (text): local sliding-window layers interleaved with global ones.

Per the Gemma 3 report, each decoder layer is

    h = x + post_attn_norm(attention(input_norm(x)))        # "sandwich" norms: in and out
    y = h + post_ffw_norm(GeGLU(pre_ffw_norm(h)))

with, compared with Llama:
  - local and global attention: layer_types (5 sliding : 1 global) says which is which; a
    local layer sees the last `sliding_window` tokens and rotates with rope_local_base_freq
    (10k), a global one sees everything and rotates with rope_theta (1M, + rope_scaling);
  - RMSNorm over each head's q and k before RoPE (instead of Gemma 2's logit soft-capping);
  - Gemma's RMSNorm scales by (1 + w), computed in fp32;
  - GeGLU feed-forward (tanh-approximated GELU gate);
  - embeddings multiplied by sqrt(hidden_size) rounded to the model dtype, as HF does;
  - attention scale query_pre_attn_scalar ** -0.5; tied embeddings.

A hybrid model keeps every KV block: the global layers read the whole context, so the block
manager frees nothing; the local layers' kernels simply start at their window.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.config import layer_sliding_windows
from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.layers.attention import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (
    MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.config_check import Supports
from pagedllm.models.utils import (
    LLAMA_PACKED_MODULES, load_params, packed, tie_word_embeddings,
)


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32, rounded to the input dtype once at the end (HF's order;
    Llama's RMSNorm rounds before the scale). The checkpoint stores w centred on 0."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), gate and up as one fused GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each (this rank's slice)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3Attention(nn.Module):
    def __init__(self, config, sliding_window: int | None, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          config.num_attention_heads, config.num_key_value_heads,
                                          bias=False)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size)
        self.q_norm = Gemma3RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # shared by every layer of its kind
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=config.query_pre_attn_scalar ** -0.5,
                              sliding_window=sliding_window)
        assert get_tp_size() == 1 or self.num_heads * get_tp_size() == config.num_attention_heads

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))  # [T, Hq, D]
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, sliding_window: int | None, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, sliding_window, rotary_emb)
        self.mlp = Gemma3MLP(hidden, config.intermediate_size)
        self.input_layernorm = Gemma3RMSNorm(hidden, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]. Each sublayer's output is normalised before the residual add.
        h = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def rope_for(config, layer_type: str) -> tuple[float, dict | None]:
    """(theta, scaling) of one layer type: transformers 5 keeps them per type in
    rope_parameters; older configs have rope_local_base_freq for the local layers."""
    params = (getattr(config, "rope_parameters", None) or {}).get(layer_type)
    if params is None:
        if layer_type == "sliding_attention":
            return float(config.rope_local_base_freq), None
        return float(config.rope_theta), getattr(config, "rope_scaling", None)
    scaling = params if params.get("rope_type", "default") != "default" else None
    return float(params["rope_theta"]), scaling


class Gemma3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # NOTE: HF rounds sqrt(hidden) to the model dtype before the multiply (bf16: 25.25,
        # not 25.30, for hidden 640); so do we, in forward.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5,
                                                         dtype=torch.float32), persistent=False)
        rotary = {kind: RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                        *rope_for(config, kind))
                  for kind in sorted(set(config.layer_types))}
        windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList([
            Gemma3DecoderLayer(config, windows[i], rotary[kind])
            for i, kind in enumerate(config.layer_types)])
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        x = x * self.embed_scale.to(x.dtype)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    packed_modules_mapping = LLAMA_PACKED_MODULES
    # Final logits are soft-capped when the config asks (not in any Gemma 3 release); attention
    # logits are not (the kernels do not cap scores), so a config asking for that is refused.
    supports = Supports(activations=("gelu_pytorch_tanh",), rope_types=("default", "linear"),
                        sliding_window=True, softcapping=True,
                        assumes=(("hidden_activation", "gelu_pytorch_tanh"),
                                 ("attn_logit_softcapping", None), ("attention_bias", False),
                                 ("use_bidirectional_attention", False)))

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if tie_word_embeddings(config):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # [N, vocab]
        if cap := self.final_logit_softcapping:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_params(self, packed(weights, self.packed_modules_mapping))
