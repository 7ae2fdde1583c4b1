"""Mixtral: Mistral's attention, and a sparse mixture of experts in place of the MLP.

    logits = x Wg                                  # [T, E] router, the same on every rank
    p = softmax(logits)                            # fp32
    w, e = topk(p, k);  w = w / sum(w)             # [T, k]: Mixtral renormalizes the top k
    y = sum_j w_j * Expert_{e_j}(x)                # Expert = SwiGLU, as Llama's MLP

Each expert is split over tensor-parallel ranks by its intermediate dimension, like a dense MLP
(layers/moe.py), so one all-reduce per layer finishes it. Checkpoint names (HF):

    model.layers.L.block_sparse_moe.gate.weight          [E, H]        -> mlp.gate
    model.layers.L.block_sparse_moe.experts.N.w1.weight  [I, H]  gate  -> mlp.experts.w13_weight[N]
    model.layers.L.block_sparse_moe.experts.N.w3.weight  [I, H]  up    -> mlp.experts.w13_weight[N]
    model.layers.L.block_sparse_moe.experts.N.w2.weight  [H, I]  down  -> mlp.experts.w2_weight[N]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.layers.linear import ReplicatedLinear
from pagedllm.layers.moe import MoEExperts, route_topk
from pagedllm.models.config_check import Supports
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from pagedllm.models.utils import load_params, with_experts


class MixtralMoE(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts)
        self.experts = MoEExperts(config.num_local_experts, config.hidden_size,
                                  config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        topk_weights, topk_ids = route_topk(self.gate(x), self.top_k, renormalize=True)
        return self.experts(x, topk_weights, topk_ids)  # [T, H], all-reduced


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config, layer_idx: int) -> nn.Module:
        return MixtralMoE(config)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = MixtralDecoderLayer
    supports = Supports(activations=("silu",), rope_types=("default", "linear", "llama3"),
                        sliding_window=True)
    expert_parts = {"w1": "w1", "w2": "w2", "w3": "w3"}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in weights)
        load_params(self, with_experts(renamed, self.packed_modules_mapping, self.expert_parts))
