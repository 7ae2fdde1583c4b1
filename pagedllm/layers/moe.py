"""Mixture-of-experts MLP: top-k routing over E SwiGLU experts, in plain PyTorch.

Tensor parallelism splits every expert the way a dense MLP is split (Megatron): rank r holds
rows [r I', (r+1) I') of each expert's gate and up projections and the same columns of its down
projection (I' = I / tp), so each rank computes a partial sum of every routed expert's output
and one all-reduce finishes the layer. All ranks route identically (the router is replicated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from pagedllm.layers.activation import SiluAndMul


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, keep the k largest, optionally renormalized to sum
    to 1 (Mixtral always; Qwen2-MoE when norm_topk_prob). Returns fp32 weights and ids [T, k]."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


class MoEExperts(nn.Module):
    """E experts, down(silu(gate x) * up x), each one sharded over the tp ranks.

    Parameters, per rank (I' = intermediate_size / tp):
        w13_weight  [E, 2 I', H]   rows [0, I'): gate (HF w1 / gate_proj)
                                   rows [I', 2 I'): up (HF w3 / up_proj)
        w2_weight   [E, H, I']     down (HF w2 / down_proj), this rank's columns
    `weight_loader` takes one expert's full HF tensor with shard_id = (expert, "w1"|"w2"|"w3").
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 reduce_results: bool = True) -> None:
        super().__init__()
        tp = get_tp_size()
        assert intermediate_size % tp == 0, \
            f"expert intermediate size {intermediate_size} not divisible by tp={tp}"
        self.num_experts = num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.intermediate_per_rank = i = intermediate_size // tp
        self.reduce_results = reduce_results
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * i, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, i),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.act_fn = SiluAndMul()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        expert, which = shard_id
        i, rank = self.intermediate_per_rank, get_tp_rank()
        if which == "w2":  # [H, I] -> this rank's columns
            param.data[expert].copy_(loaded.narrow(1, rank * i, i))
        else:  # [I, H] -> this rank's rows, into the gate or the up half
            offset = 0 if which == "w1" else i
            param.data[expert].narrow(0, offset, i).copy_(loaded.narrow(0, rank * i, i))

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        h, full = self.hidden_size, self.intermediate_size
        if param is self.w2_weight:
            return [((e, "w2"), (h, full)) for e in range(self.num_experts)]
        return [((e, w), (full, h)) for e in range(self.num_experts) for w in ("w1", "w3")]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        # x: [T, H]; topk_weights (fp32), topk_ids: [T, k]
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self._forward_dense(x, topk_weights, topk_ids)
        else:
            out = self._forward_sparse(x, topk_weights, topk_ids)
        return tp_all_reduce(out) if self.reduce_results else out

    def _forward_sparse(self, x, topk_weights, topk_ids) -> torch.Tensor:
        """Each expert runs on the tokens routed to it only (the ids are read on the host)."""
        out = torch.zeros_like(x)
        for e in topk_ids.unique().tolist():
            token, slot = (topk_ids == e).nonzero(as_tuple=True)  # [n] each
            h = self.act_fn(F.linear(x[token], self.w13_weight[e]))  # [n, I']
            y = F.linear(h, self.w2_weight[e])  # [n, H]
            # NOTE: index_put_ rather than index_add_, which costs milliseconds on a CPU even
            # for a handful of rows; a token picks an expert at most once, so rows are unique.
            out.index_put_((token,), (y * topk_weights[token, slot, None]).to(x.dtype),
                           accumulate=True)
        return out

    def _forward_dense(self, x, topk_weights, topk_ids) -> torch.Tensor:
        """Every expert on every token, weighted by zero where it was not chosen.

        NOTE: more FLOPs than the sparse path, but with no data-dependent shapes and no host
        read, so a CUDA graph can capture it (decode batches, where weights dominate anyway).
        """
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            weight = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]
            h = self.act_fn(F.linear(x, self.w13_weight[e]))
            out += (F.linear(h, self.w2_weight[e]) * weight).to(x.dtype)
        return out
