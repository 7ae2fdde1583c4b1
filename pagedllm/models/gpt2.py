"""GPT-2 (Radford et al., 2019): pre-LN decoder with learned positions and a GELU MLP.

    h = E_tok[x] + E_pos[p]
    each block:  h = h + Attn(LN1(h));  h = h + FC2(gelu(FC1(LN2(h))))
    logits = LN_f(h) E_tok^T                     # head tied to the token embedding

Checkpoints store every projection as a `Conv1D`, whose weight is [in, out], the transpose of
nn.Linear's, and q, k, v fused into one `c_attn` of [hidden, 3 hidden]: we transpose each at
load and cut c_attn into q | k | v so the QKV layer can keep its own heads on each rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.layers.activation import ELEMENTWISE_ACTIVATIONS, get_act_fn
from pagedllm.layers.attention import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.norm import LayerNorm
from pagedllm.models.config_check import Supports
from pagedllm.models.utils import Weight, load_params

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        self.c_attn = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=True)
        self.num_heads = self.c_attn.num_heads  # per rank
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.attn = Attention(self.num_heads, self.head_dim, self.num_heads, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # [T, H D] each (H heads on this rank)
        heads = (-1, self.num_heads, self.head_dim)
        return self.c_proj(self.attn(q.view(heads), k.view(heads), v.view(heads)).flatten(1))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList([GPT2Block(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        for block in self.h:
            h = block(h)
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    supports = Supports(activations=ELEMENTWISE_ACTIVATIONS, assumes=(
        ("scale_attn_by_inverse_layer_idx", False),  # Mistral-GPT2 / Stanford CRFM variants
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ))

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_params(self, self._from_conv1d(weights))

    def _from_conv1d(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[Weight]:
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints saved the causal mask buffers
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"  # the original checkpoints were saved from GPT2Model
            if name.endswith(_CONV1D):
                tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
            if ".attn.c_attn." in name:  # [3 hidden, ...] rows: q | k | v
                for shard_id, part in zip("qkv", tensor.chunk(3, dim=0)):
                    yield name, part, shard_id
            else:
                yield name, tensor, None
