"""OPT (Zhang et al., 2022): a GPT-style decoder with learned positions and LayerNorm.

    h = project_in(E_tok[x]) + E_pos[p + 2]      # NOTE: OPT's position table is offset by 2
    each layer, pre-LN (125m, 1.3b, ...):        post-LN (350m, do_layer_norm_before=False):
        h = h + Attn(LN1(h))                         h = LN1(h + Attn(h))
        h = h + FC2(act(FC1(LN2(h))))                h = LN2(h + FC2(act(FC1(h))))
    logits = project_out(LN_f(h)) E_tok^T        # LN_f only in pre-LN models; head tied

Multi-head attention (no GQA, no RoPE), biases on every projection (`enable_bias`), ReLU in the
released models (`activation_function`). opt-350m embeds tokens in word_embed_proj_dim = 512
and projects in and out of the hidden size 1024 around the decoder.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.layers.activation import ELEMENTWISE_ACTIVATIONS, get_act_fn
from pagedllm.layers.attention import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (
    ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
)
from pagedllm.layers.norm import LayerNorm
from pagedllm.models.config_check import Supports
from pagedllm.models.utils import load_params, packed

POSITION_OFFSET = 2  # OPT reserved the first two rows of its position table (fairseq padding)


class OPTAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, heads, bias = config.hidden_size, config.num_attention_heads, config.enable_bias
        self.head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.out_proj = RowParallelLinear(hidden, hidden, bias)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_heads,
                              scale=self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # [T, H D] each (H heads on this rank)
        shape = (-1, self.num_heads, self.head_dim)
        o = self.attn(q.view(shape), k.view(shape), v.view(shape))  # [T, H, D]
        return self.out_proj(o.flatten(1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = LayerNorm(hidden)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias)
        self.activation_fn = get_act_fn(config.activation_function)
        self.final_layer_norm = LayerNorm(hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pre_ln = self.do_layer_norm_before
        x = self.self_attn_layer_norm(h) if pre_ln else h
        h = h + self.self_attn(x)
        if not pre_ln:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if pre_ln else h
        h = h + self.fc2(self.activation_fn(self.fc1(x)))
        return h if pre_ln else self.final_layer_norm(h)


class OPTDecoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, proj_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
        self.embed_positions = VocabParallelEmbedding(
            config.max_position_embeddings + POSITION_OFFSET, hidden)
        projected = proj_dim != hidden
        self.project_in = ReplicatedLinear(proj_dim, hidden) if projected else None
        self.project_out = ReplicatedLinear(hidden, proj_dim) if projected else None
        # NOTE: as in HF, post-LN models have no final norm (each layer already ends in one);
        # _remove_final_layer_norm marks old fine-tunes that dropped it too.
        removed = getattr(config, "_remove_final_layer_norm", False)
        final_norm = config.do_layer_norm_before and not removed
        self.final_layer_norm = LayerNorm(hidden) if final_norm else None
        self.layers = nn.ModuleList(
            [OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, proj_dim]
        if self.project_in is not None:
            h = self.project_in(h)  # [T, hidden]
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)  # [T, proj_dim]
        return h


class OPTModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    supports = Supports(activations=ELEMENTWISE_ACTIVATIONS,
                        assumes=(("layer_norm_elementwise_affine", True),))

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The original checkpoints were saved from OPTModel: "decoder.*", not "model.decoder.*".
        named = ((f"model.{n}" if n.startswith("decoder.") else n, t) for n, t in weights)
        load_params(self, packed(named, self.packed_modules_mapping))
