"""Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm -> GQA attention with RoPE -> SwiGLU MLP.

Attention K/V live in the paged cache (see layers/attention.py); the forward pass takes one flat
batch of tokens from many sequences, with no padding between them.

Families that differ from Llama in one place reuse these classes: Qwen3 (q/k RMSNorm,
`qk_norm`), Phi-3 (fused checkpoint tensors, partial rotary), Mixtral and Qwen2-MoE (an MoE block
in place of the MLP: `LlamaDecoderLayer.build_mlp`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from pagedllm.config import layer_sliding_windows
from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (
    MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding, partial_rotary_factor, rope_config
from pagedllm.models.config_check import Supports
from pagedllm.models.utils import LLAMA_PACKED_MODULES, load_params, packed
from pagedllm.ops.cpu_decoder import DecoderStack


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool = False,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, num_kv_heads, qkv_bias)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size,
                                        bias=getattr(config, "attention_bias", False))
        # Qwen3: an RMSNorm over each head's q and k, before RoPE
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = RotaryEmbedding(
            self.head_dim, config.max_position_embeddings, *rope_config(config),
            rotary_dim=int(self.head_dim * partial_rotary_factor(config)))
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=self.head_dim ** -0.5, sliding_window=sliding_window)
        assert tp == 1 or self.num_heads * tp == config.num_attention_heads

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool = False, layer_idx: int = 0) -> None:
        super().__init__()
        # The window HF gives this layer (Mistral: every layer; layer_types: the sliding
        # ones). A family that does not declare support for it is refused by config_check.
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm,
                                        layer_sliding_windows(config)[layer_idx])
        self.mlp = self.build_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        # The residual add is fused into the next norm: norm(x + residual) and x + residual.
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        """The feed-forward block: [T, hidden] -> [T, hidden] (MoE families override it)."""
        return LlamaMLP(config.hidden_size, config.intermediate_size)


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool = False,
                 layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([layer_cls(config, qkv_bias, qk_norm, layer_idx=i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # On a CPU the layers below can run as one C++ call of the same kernels
        # (ops/cpu_decoder.py checks the rest); only for layers that are these classes.
        plain = all(type(layer).forward is LlamaDecoderLayer.forward
                    and type(layer.self_attn).forward is LlamaAttention.forward
                    and type(layer.mlp) is LlamaMLP for layer in self.layers)
        self.cpu_stack = DecoderStack(self.layers) if plain else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        stacked = self.cpu_stack(positions, hidden) if self.cpu_stack is not None else None
        if stacked is not None:
            hidden, residual = stacked
        else:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = LLAMA_PACKED_MODULES
    qkv_bias = False
    qk_norm = False
    decoder_layer_cls = LlamaDecoderLayer
    supports = Supports(activations=("silu",), rope_types=("default", "linear", "llama3"),
                        assumes=(("mlp_bias", False),))

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, qkv_bias, self.qk_norm, self.decoder_layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named tensors into our (possibly fused, sharded) parameters."""
        load_params(self, packed(weights, self.packed_modules_mapping))


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window on every layer (config.sliding_window)."""

    supports = replace(LlamaForCausalLM.supports, sliding_window=True)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    supports = LlamaForCausalLM.supports  # not inherited (config_check.py): declared again
    # (a config with use_sliding_window=True is refused: no sliding window here)
