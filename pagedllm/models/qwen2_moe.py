"""Qwen2-MoE (Qwen1.5-MoE): Qwen2's attention, and in the sparse layers many small routed
experts plus one shared expert that every token takes, behind a sigmoid gate.

    w, e = topk(softmax(x Wg), k)                  # fp32; w / sum(w) only if norm_topk_prob
    y = sum_j w_j * Expert_{e_j}(x)  +  sigmoid(x Ws) * SharedExpert(x)

Layer L is sparse unless it is in `mlp_only_layers` or (L + 1) is not a multiple of
`decoder_sparse_step`; a dense layer has an ordinary SwiGLU MLP of `intermediate_size`.
Routed experts are `moe_intermediate_size` wide, the shared one `shared_expert_intermediate_size`;
all are split over tensor-parallel ranks by that width (layers/moe.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.layers.linear import ReplicatedLinear
from pagedllm.layers.moe import MoEExperts, route_topk
from pagedllm.models.config_check import Supports
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.models.utils import load_params, with_experts


class Qwen2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = ReplicatedLinear(hidden, config.num_experts)
        self.experts = MoEExperts(config.num_experts, hidden, config.moe_intermediate_size)
        self.shared_expert = LlamaMLP(hidden, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        topk_weights, topk_ids = route_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        # NOTE: HF rounds the routing weights to the activation dtype before using them.
        routed = self.experts(x, topk_weights.to(x.dtype), topk_ids)  # [T, H], all-reduced
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        sparse = (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
                  and (layer_idx + 1) % config.decoder_sparse_step == 0)
        if sparse:
            return Qwen2MoeSparseMoeBlock(config)
        return LlamaMLP(config.hidden_size, config.intermediate_size)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen2MoeDecoderLayer
    qkv_bias = True
    supports = Supports(activations=("silu",), rope_types=("default", "linear", "llama3"),
                        assumes=(("qkv_bias", True),))
    expert_parts = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_params(self, with_experts(weights, self.packed_modules_mapping, self.expert_parts))
